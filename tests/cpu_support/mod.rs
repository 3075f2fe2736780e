//! Shared by the CPU backend tests: the fixture checkpoints of tests/fixtures/ with their
//! transformers references, and greedy generation straight on a `Backend`.
//!
//! Tolerance: max |ours - reference| over the vocabulary (logits of std ~5). Both sides compute
//! in f32; measured differences are ~1e-5 on every checkpoint. BF16: 1e-4. FP8: 1e-3. Caveat for
//! FP8 (tests/fixtures/README.md): per-token e4m3 quantization is discontinuous, so a change in
//! our f32 arithmetic (summation order, exp) that flips one activation's e4m3 rounding moves these
//! tiny models' logits by ~0.05-1 while the BF16 tests stay at ~1e-5.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use tandem::backend::cpu::CpuBackend;
use tandem::backend::{Backend, Batch, Emit, SeqChunk, SeqOutput};
use tandem::model::{load_weights, LlamaConfig, LlamaWeights, LoadFormat, ModelFiles};

pub struct Fixture {
    pub config: LlamaConfig,
    pub weights: LlamaWeights,
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    /// (step, logits) of the steps the reference stored
    pub logits: Vec<(usize, Vec<f32>)>,
    pub tolerance: f32,
}

/// `$TANDEM_FIXTURES/<name>` (the GPU machine gets a copy of the fixtures), else tests/fixtures.
pub fn fixture_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("TANDEM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    base.join(name)
}

pub fn fixture(name: &str) -> Fixture {
    let dir = fixture_dir(name);
    assert!(
        dir.join("reference.json").exists(),
        "fixture {} missing",
        dir.display()
    );
    let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
    let weights = load_weights(&files, LoadFormat::Safetensors, 0).unwrap();
    let config = files.config;
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let logits = r["logits"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(step, l)| {
            let l = l
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (step.parse().unwrap(), l)
        })
        .collect();
    Fixture {
        tolerance: if config.quantization.is_some() {
            1e-3
        } else {
            1e-4
        },
        config,
        weights,
        prompt: ids(&r["prompt_tokens"]),
        tokens: ids(&r["greedy_tokens"]),
        logits,
    }
}

pub fn argmax(l: &[f32]) -> u32 {
    tandem::backend::sampling::greedy(l)
}

/// Greedy sampling on the device (GPU backends' sampler; `uniform` is unused at temperature 0).
pub fn device_greedy() -> Emit {
    Emit::Sample(tandem::backend::DeviceSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        uniform: 0.3,
    })
}

pub fn logits_of(out: SeqOutput) -> Vec<f32> {
    match out {
        SeqOutput::Logits(l) => l,
        other => panic!("expected logits, got {other:?}"),
    }
}

/// Greedy generation of one sequence: the prompt in chunks of the given sizes (the rest in a
/// last chunk), then one token per step. Returns the tokens and the logits of every step.
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    chunks: &[usize],
    block_table: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut start = 0;
    let mut sizes: Vec<usize> = chunks.to_vec();
    sizes.push(prompt.len() - chunks.iter().sum::<usize>());
    let mut logits = vec![];
    for (n, &size) in sizes.iter().enumerate() {
        let last = n + 1 == sizes.len();
        let chunk = SeqChunk {
            tokens: prompt[start..start + size].to_vec(),
            start_pos: start,
            block_table: block_table.to_vec(),
            emit: if last { Emit::Logits } else { Emit::Nothing },
        };
        let out = backend.step(&Batch { seqs: vec![chunk] }).unwrap();
        if last {
            logits.push(logits_of(out.into_iter().next().unwrap()));
        } else {
            assert_eq!(out, vec![SeqOutput::Nothing]);
        }
        start += size;
    }
    let tokens = decode(
        backend,
        prompt.len(),
        argmax(&logits[0]),
        block_table,
        steps,
        &mut logits,
    );
    (tokens, logits)
}

/// Decodes from `first` (the token at position `pos`) until `steps` tokens, pushing logits.
pub fn decode(
    backend: &mut dyn Backend,
    mut pos: usize,
    first: u32,
    block_table: &[u32],
    steps: usize,
    logits: &mut Vec<Vec<f32>>,
) -> Vec<u32> {
    let mut tokens = vec![first];
    while tokens.len() < steps {
        let chunk = SeqChunk {
            tokens: vec![*tokens.last().unwrap()],
            start_pos: pos,
            block_table: block_table.to_vec(),
            emit: Emit::Logits,
        };
        let l = logits_of(
            backend
                .step(&Batch { seqs: vec![chunk] })
                .unwrap()
                .remove(0),
        );
        tokens.push(argmax(&l));
        logits.push(l);
        pos += 1;
    }
    tokens
}

pub fn check(f: &Fixture, tokens: &[u32], logits: &[Vec<f32>], what: &str) {
    assert_eq!(
        tokens,
        f.tokens.as_slice(),
        "{what}: greedy tokens differ from transformers"
    );
    for (step, want) in &f.logits {
        let got = &logits[*step];
        assert_eq!(got.len(), want.len());
        let diff = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= f.tolerance,
            "{what}: step {step} logits differ by up to {diff} (tolerance {})",
            f.tolerance
        );
    }
}

/// Block ids for `positions` tokens, deliberately not in order.
pub fn scattered_blocks(positions: usize, block_size: usize, offset: u32) -> Vec<u32> {
    (0..positions.div_ceil(block_size) as u32)
        .rev()
        .map(|b| b * 2 + offset)
        .collect()
}

pub fn run_reference(name: &str, block_size: usize, chunks: &[usize]) {
    let f = fixture(name);
    let total = f.prompt.len() + f.tokens.len();
    let table = scattered_blocks(total, block_size, 1);
    let mut backend =
        CpuBackend::new(&f.config, &f.weights, block_size, 2 * table.len() + 2).unwrap();
    let (tokens, logits) = generate(&mut backend, &f.prompt, chunks, &table, f.tokens.len());
    check(
        &f,
        &tokens,
        &logits,
        &format!("{name}, block size {block_size}, chunks {chunks:?}"),
    );
}
