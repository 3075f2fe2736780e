//! The CPU backend against Hugging Face transformers on the tiny checkpoints of tests/fixtures/
//! (made by make_fixtures.py): greedy tokens must match exactly, logits within the tolerance
//! stated in cpu_support.

mod cpu_support;
use cpu_support::run_reference;

#[test]
fn bf16_matches_transformers() {
    run_reference("llama-bf16", 128, &[]);
}

#[test]
fn fp8_matches_transformers() {
    run_reference("llama-fp8", 128, &[]);
}

/// Written by transformers 5's `save_pretrained` (`rope_parameters`, `dtype`), with head_dim 16
/// on hidden 48 and a single KV head.
#[test]
fn hf_saved_matches_transformers() {
    run_reference("llama-hf-saved", 128, &[]);
}

#[test]
fn chunked_prefill_and_small_blocks_match_transformers() {
    for name in ["llama-bf16", "llama-fp8", "llama-hf-saved"] {
        run_reference(name, 16, &[20, 17]);
        run_reference(name, 7, &[1, 33, 5]);
    }
}
