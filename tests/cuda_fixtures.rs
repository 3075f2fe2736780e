//! The CUDA backend against the tiny reference checkpoints of tests/fixtures/ (Hugging Face
//! transformers in float32; the CPU backend is checked against the same files). In the F32
//! precision mode greedy tokens must be equal over 20 steps, with chunked prefill, the device
//! sampler, and prefix sharing, and logits close. In the BF16 (serving) mode, the logit error is
//! bounded and reported, with how many tokens agree.
//!
//! Fixtures are read from `$TANDEM_FIXTURES` (the GPU machine gets a copy) or tests/fixtures.
//! Skips when no GPU is present.

use tandem::backend::cpu::CpuBackend;
use tandem::backend::cuda::ops::Precision;
use tandem::backend::cuda::{gpu_available, CudaBackend, CudaOptions, WeightSource};
use tandem::backend::{Backend, Batch, Emit, KvCacheDtype, SeqChunk, SeqOutput};

mod cpu_support;

use cpu_support::{argmax, device_greedy as greedy, fixture, Fixture};

const BS: usize = 16;

fn out_token(o: &SeqOutput) -> (u32, Option<Vec<f32>>) {
    match o {
        SeqOutput::Logits(l) => (argmax(l), Some(l.clone())),
        SeqOutput::Token(t) => (*t, None),
        SeqOutput::Nothing => panic!("expected an output"),
    }
}

/// Greedy generation: the prompt from `start` (positions before it already in the cache) in
/// chunks of at most `chunk`, then one token per step. Logits of each step when `emit` is Logits.
fn generate(
    b: &mut CudaBackend,
    prompt: &[u32],
    start: usize,
    chunk: usize,
    table: &[u32],
    steps: usize,
    emit: Emit,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let (mut tokens, mut logits) = (vec![], vec![]);
    let mut pos = start;
    while pos < prompt.len() {
        let end = (pos + chunk).min(prompt.len());
        let last = end == prompt.len();
        let c = SeqChunk {
            tokens: prompt[pos..end].to_vec(),
            start_pos: pos,
            block_table: table.to_vec(),
            emit: if last { emit.clone() } else { Emit::Nothing },
        };
        let out = b.step(&Batch { seqs: vec![c] }).unwrap();
        if last {
            let (t, l) = out_token(&out[0]);
            tokens.push(t);
            logits.extend(l);
        } else {
            assert_eq!(out, vec![SeqOutput::Nothing]);
        }
        pos = end;
    }
    while tokens.len() < steps {
        let c = SeqChunk {
            tokens: vec![*tokens.last().unwrap()],
            start_pos: pos,
            block_table: table.to_vec(),
            emit: emit.clone(),
        };
        let (t, l) = out_token(&b.step(&Batch { seqs: vec![c] }).unwrap()[0]);
        tokens.push(t);
        logits.extend(l);
        pos += 1;
    }
    (tokens, logits)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn backend(f: &Fixture, precision: Precision) -> CudaBackend {
    backend_kv(f, precision, KvCacheDtype::Auto)
}

fn backend_kv(f: &Fixture, precision: Precision, kv_cache_dtype: KvCacheDtype) -> CudaBackend {
    let opts = CudaOptions {
        kv_cache_dtype,
        block_size: BS,
        num_blocks: Some(64),
        max_num_batched_tokens: 256,
        max_num_seqs: 8,
        precision,
        // Small parts, so decode steps here also run split-K attention.
        split_min_keys: 16,
        ..Default::default()
    };
    CudaBackend::new(&f.config, WeightSource::Host(&f.weights), opts).unwrap()
}

/// F32 precision: tokens equal the reference on every path, logits within `tolerance`.
fn run_fixture(name: &str, tolerance: f32) {
    if !gpu_available() {
        eprintln!("skipping: no CUDA GPU on this machine");
        return;
    }
    let f = fixture(name);
    let mut b = backend(&f, Precision::F32);
    let steps = f.tokens.len();
    let need = (f.prompt.len() + steps).div_ceil(BS);
    let table_a: Vec<u32> = (0..need as u32).collect();

    // Chunked prefill (chunks of 25), logits every step.
    let (tokens, logits) = generate(&mut b, &f.prompt, 0, 25, &table_a, steps, Emit::Logits);
    for (step, want) in &f.logits {
        let d = max_abs(&logits[*step], want);
        println!("{name}: step {step} max |logit - reference| = {d:.4}");
        assert!(
            d < tolerance,
            "{name}: step {step} logits differ by {d} (tolerance {tolerance})"
        );
    }
    assert_eq!(
        tokens, f.tokens,
        "{name}: greedy tokens differ from the reference"
    );

    // Whole prompt in one chunk, tokens from the device sampler.
    let table_b: Vec<u32> = (need as u32..2 * need as u32).collect();
    let (sampled, _) = generate(
        &mut b,
        &f.prompt,
        0,
        f.prompt.len(),
        &table_b,
        steps,
        greedy(),
    );
    assert_eq!(
        sampled, f.tokens,
        "{name}: device-sampled greedy tokens differ"
    );

    // Prefix sharing: reuse the first 3 full blocks of sequence A, compute only the rest.
    let shared = 3 * BS;
    let mut table_c: Vec<u32> = table_a[..3].to_vec();
    table_c.extend((2 * need as u32..).take(need - 3));
    let (prefixed, _) = generate(&mut b, &f.prompt, shared, 16, &table_c, steps, greedy());
    assert_eq!(
        prefixed, f.tokens,
        "{name}: tokens after a shared prefix differ"
    );
    println!(
        "{name}: {steps} greedy tokens equal the reference (chunked, one-shot, shared prefix)"
    );
}

/// BF16 precision (serving): activations and KV rounded to BF16, so logits move by ~1e-2
/// relative; reports how many greedy tokens still agree and bounds the logit error.
fn bf16_precision_report(name: &str, bound: f32, kv: KvCacheDtype) {
    if !gpu_available() {
        eprintln!("skipping: no CUDA GPU on this machine");
        return;
    }
    let f = fixture(name);
    let mut b = backend_kv(&f, Precision::Bf16, kv);
    let name = &format!("{name} (KV {kv:?})");
    let need = (f.prompt.len() + f.tokens.len()).div_ceil(BS);
    let table: Vec<u32> = (0..need as u32).collect();
    let (tokens, logits) = generate(
        &mut b,
        &f.prompt,
        0,
        25,
        &table,
        f.tokens.len(),
        Emit::Logits,
    );
    let agree = tokens
        .iter()
        .zip(&f.tokens)
        .take_while(|(a, b)| a == b)
        .count();
    println!(
        "{name} in BF16 precision: first {agree}/{} greedy tokens equal the f32 reference",
        f.tokens.len()
    );
    let d = max_abs(
        &logits[0],
        &f.logits.iter().find(|(s, _)| *s == 0).unwrap().1,
    );
    println!("{name} in BF16 precision: step 0 max |logit - reference| = {d:.4}");
    assert!(d < bound, "{name}: BF16-precision logits off by {d}");
    assert_eq!(tokens[0], f.tokens[0]);
}

/// The CPU backend and the CUDA backend (F32 precision) on the same batches: chunked prefill of two
/// sequences in one step, the second sharing the first's prefix blocks, then batched decode.
fn against_cpu(name: &str, tolerance: f32) {
    if !gpu_available() {
        eprintln!("skipping: no CUDA GPU on this machine");
        return;
    }
    let f = fixture(name);
    let mut gpu = backend(&f, Precision::F32);
    let mut cpu = CpuBackend::new(&f.config, &f.weights, BS, 64).unwrap();
    let steps = f.tokens.len();
    let need = (f.prompt.len() + steps).div_ceil(BS);
    let a: Vec<u32> = (0..need as u32).collect();
    let mut b: Vec<u32> = a[..2].to_vec();
    b.extend((need as u32..).take(need - 2));
    let shared = 2 * BS;
    let mut outs: Vec<Vec<Vec<f32>>> = vec![];
    for backend in [&mut gpu as &mut dyn Backend, &mut cpu as &mut dyn Backend] {
        let mut logits = vec![];
        // Sequence A's first chunk alone, then A's rest and B's suffix together.
        let first = Batch {
            seqs: vec![SeqChunk {
                tokens: f.prompt[..shared].to_vec(),
                start_pos: 0,
                block_table: a.clone(),
                emit: Emit::Nothing,
            }],
        };
        assert_eq!(backend.step(&first).unwrap(), vec![SeqOutput::Nothing]);
        let rest = Batch {
            seqs: vec![
                SeqChunk {
                    tokens: f.prompt[shared..].to_vec(),
                    start_pos: shared,
                    block_table: a.clone(),
                    emit: Emit::Logits,
                },
                SeqChunk {
                    tokens: f.prompt[shared..].to_vec(),
                    start_pos: shared,
                    block_table: b.clone(),
                    emit: Emit::Logits,
                },
            ],
        };
        let out = backend.step(&rest).unwrap();
        let mut toks: Vec<u32> = out.iter().map(|o| out_token(o).0).collect();
        logits.extend(out.iter().filter_map(|o| out_token(o).1));
        for pos in f.prompt.len()..f.prompt.len() + steps - 1 {
            let seqs = [&a, &b]
                .iter()
                .zip(&toks)
                .map(|(t, &tok)| SeqChunk {
                    tokens: vec![tok],
                    start_pos: pos,
                    block_table: (*t).clone(),
                    emit: Emit::Logits,
                })
                .collect();
            let out = backend.step(&Batch { seqs }).unwrap();
            toks = out.iter().map(|o| out_token(o).0).collect();
            logits.extend(out.iter().filter_map(|o| out_token(o).1));
        }
        outs.push(logits);
    }
    let worst = outs[0]
        .iter()
        .zip(&outs[1])
        .map(|(g, c)| max_abs(g, c))
        .fold(0.0, f32::max);
    let gpu_tokens: Vec<u32> = outs[0].iter().map(|l| argmax(l)).collect();
    let cpu_tokens: Vec<u32> = outs[1].iter().map(|l| argmax(l)).collect();
    println!(
        "{name}: CUDA (F32) vs CPU over {} outputs: max |logit diff| {worst:.2e}",
        outs[0].len()
    );
    assert_eq!(
        gpu_tokens, cpu_tokens,
        "{name}: greedy tokens differ from the CPU backend's"
    );
    assert!(
        worst < tolerance,
        "{name}: logits differ from the CPU backend's by {worst}"
    );
}

#[test]
fn bf16_fixture_matches_cpu_backend() {
    against_cpu("llama-bf16", 1e-3);
}

#[test]
fn fp8_fixture_matches_cpu_backend() {
    against_cpu("llama-fp8", 2e-2);
}

#[test]
fn bf16_fixture_matches_reference() {
    run_fixture("llama-bf16", 1e-3);
}

#[test]
fn fp8_fixture_matches_reference() {
    run_fixture("llama-fp8", 2e-2);
}

#[test]
fn bf16_fixture_in_bf16_precision() {
    bf16_precision_report("llama-bf16", 0.5, KvCacheDtype::Auto);
}

/// `--kv-cache-dtype fp8`'s effect on accuracy: the same report with e4m3 KV.
#[test]
fn bf16_fixture_with_fp8_kv_cache() {
    bf16_precision_report("llama-bf16", 1.0, KvCacheDtype::Fp8);
}

#[test]
fn fp8_fixture_with_fp8_kv_cache() {
    bf16_precision_report("llama-fp8", 3.0, KvCacheDtype::Fp8);
}

#[test]
fn fp8_fixture_in_bf16_precision() {
    bf16_precision_report("llama-fp8", 3.0, KvCacheDtype::Auto);
}
