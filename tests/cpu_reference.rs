//! The CPU backend against Hugging Face transformers on the tiny checkpoints of tests/fixtures/
//! (made by make_fixtures.py): greedy tokens must match exactly, logits within a tolerance.
//!
//! Tolerance: max |ours - reference| over the vocabulary (logits of std ~5). Both sides compute
//! in f32; measured differences are ~1e-5 on both checkpoints. BF16: 1e-4. FP8: 1e-3, looser
//! because a last-bit float difference can move an activation across an e4m3 rounding boundary.

use std::path::{Path, PathBuf};
use tandem::backend::cpu::CpuBackend;
use tandem::backend::{Backend, Batch, DeviceSampling, Emit, SeqChunk, SeqOutput};
use tandem::model::{load_weights, LlamaConfig, LlamaWeights, LoadFormat, ModelFiles};

struct Fixture {
    config: LlamaConfig,
    weights: LlamaWeights,
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    /// (step, logits) of the steps the reference stored
    logits: Vec<(usize, Vec<f32>)>,
    tolerance: f32,
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fixture(name: &str) -> Fixture {
    let dir = fixture_dir(name);
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

fn argmax(l: &[f32]) -> u32 {
    tandem::backend::sampling::greedy(l)
}

fn logits_of(out: SeqOutput) -> Vec<f32> {
    match out {
        SeqOutput::Logits(l) => l,
        other => panic!("expected logits, got {other:?}"),
    }
}

/// Greedy generation of one sequence: the prompt in chunks of the given sizes (the rest in a
/// last chunk), then one token per step. Returns the tokens and the logits of every step.
fn generate(
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
fn decode(
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

fn check(f: &Fixture, tokens: &[u32], logits: &[Vec<f32>], what: &str) {
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
fn scattered_blocks(positions: usize, block_size: usize, offset: u32) -> Vec<u32> {
    (0..positions.div_ceil(block_size) as u32)
        .rev()
        .map(|b| b * 2 + offset)
        .collect()
}

fn run_reference(name: &str, block_size: usize, chunks: &[usize]) {
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

#[test]
fn exported_blocks_continue_on_another_backend() {
    let f = fixture("llama-fp8");
    let bs = 16;
    let total = f.prompt.len() + f.tokens.len();
    let table_a = scattered_blocks(total, bs, 0);
    let mut a = CpuBackend::new(&f.config, &f.weights, bs, 2 * table_a.len() + 2).unwrap();
    let prefill = SeqChunk {
        tokens: f.prompt.clone(),
        start_pos: 0,
        block_table: table_a.clone(),
        emit: Emit::Logits,
    };
    let first = logits_of(
        a.step(&Batch {
            seqs: vec![prefill],
        })
        .unwrap()
        .remove(0),
    );
    let used = f.prompt.len().div_ceil(bs);
    let data = a.export_blocks(&table_a[..used]).unwrap();
    assert_eq!(data.len(), used * a.kv_layout().block_bytes());

    // Another backend, other block ids: only the imported KV carries the prompt.
    let table_b: Vec<u32> = (0..total.div_ceil(bs) as u32).map(|b| b + 3).collect();
    let mut b = CpuBackend::new(&f.config, &f.weights, bs, table_b.len() + 3).unwrap();
    assert_eq!(a.kv_layout(), b.kv_layout());
    b.import_blocks(&table_b[..used], &data).unwrap();
    let mut logits = vec![first];
    let tokens = decode(
        &mut b,
        f.prompt.len(),
        argmax(&logits[0]),
        &table_b,
        f.tokens.len(),
        &mut logits,
    );
    check(&f, &tokens, &logits, "decode after import");
    assert!(b.import_blocks(&table_b[..used], &data[1..]).is_err());
    assert!(b.export_blocks(&[99]).is_err());
}

#[test]
fn batched_sequences_match_each_alone() {
    let f = fixture("llama-bf16");
    let bs = 8;
    let prompts: Vec<Vec<u32>> = vec![
        f.prompt.clone(),
        f.prompt[..45].iter().rev().copied().collect(),
        f.prompt[10..19].to_vec(),
    ];
    let steps = 6;
    // Alone, each in a fresh backend.
    let alone: Vec<(Vec<u32>, Vec<Vec<f32>>)> = prompts
        .iter()
        .map(|p| {
            let table = scattered_blocks(p.len() + steps, bs, 0);
            let mut backend = CpuBackend::new(&f.config, &f.weights, bs, 2 * table.len()).unwrap();
            generate(&mut backend, p, &[], &table, steps)
        })
        .collect();
    // Together: one backend, disjoint block tables; sequence 2 starts a step later, so steps mix
    // prefill and decode chunks at different positions.
    let mut backend = CpuBackend::new(&f.config, &f.weights, bs, 64).unwrap();
    let tables: Vec<Vec<u32>> = (0..3u32)
        .map(|s| {
            (0..((prompts[s as usize].len() + steps).div_ceil(bs)) as u32)
                .map(|b| b * 3 + s)
                .collect()
        })
        .collect();
    let mut tokens: Vec<Vec<u32>> = vec![vec![]; 3];
    let mut logits: Vec<Vec<Vec<f32>>> = vec![vec![]; 3];
    for step in 0..=steps {
        let mut seqs = vec![];
        let mut who = vec![];
        for s in 0..3 {
            let begin = if s == 2 { 1 } else { 0 };
            if step < begin || tokens[s].len() == steps {
                continue;
            }
            let (toks, start) = if tokens[s].is_empty() {
                (prompts[s].clone(), 0)
            } else {
                (
                    vec![*tokens[s].last().unwrap()],
                    prompts[s].len() + tokens[s].len() - 1,
                )
            };
            seqs.push(SeqChunk {
                tokens: toks,
                start_pos: start,
                block_table: tables[s].clone(),
                emit: Emit::Logits,
            });
            who.push(s);
        }
        for (s, out) in who.into_iter().zip(backend.step(&Batch { seqs }).unwrap()) {
            let l = logits_of(out);
            tokens[s].push(argmax(&l));
            logits[s].push(l);
        }
    }
    for s in 0..3 {
        assert_eq!(tokens[s], alone[s].0, "sequence {s}");
        for (got, want) in logits[s].iter().zip(&alone[s].1) {
            let diff = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "sequence {s}: batched logits differ by {diff}");
        }
    }
}

#[test]
fn device_sampling_and_bad_batches() {
    let f = fixture("llama-bf16");
    let bs = 16;
    let mut backend = CpuBackend::new(&f.config, &f.weights, bs, 8).unwrap();
    let chunk = |tokens: Vec<u32>, start_pos: usize, block_table: Vec<u32>| SeqChunk {
        tokens,
        start_pos,
        block_table,
        emit: Emit::Sample(DeviceSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            uniform: 0.5,
        }),
    };
    let bad = [
        (
            chunk(f.prompt.clone(), 0, vec![0, 1, 2]),
            "need 4 KV blocks",
        ),
        (
            chunk(f.prompt.clone(), 0, vec![0, 1, 2, 8]),
            "block id 8 is out of range",
        ),
        (
            chunk(vec![3], 128, vec![0; 9]),
            "exceed max_position_embeddings",
        ),
        (chunk(vec![600], 0, vec![0]), "token id 600 is out of range"),
        (chunk(vec![], 0, vec![0]), "has no tokens"),
    ];
    for (c, message) in bad {
        let err = backend
            .step(&Batch { seqs: vec![c] })
            .unwrap_err()
            .to_string();
        assert!(err.contains(message), "{err:?} should contain {message:?}");
    }
    // Still serves a good batch afterwards, and device greedy picks the reference token.
    let out = backend
        .step(&Batch {
            seqs: vec![chunk(f.prompt.clone(), 0, vec![4, 5, 6, 7])],
        })
        .unwrap();
    assert_eq!(out, vec![SeqOutput::Token(f.tokens[0])]);
    assert!(CpuBackend::new(&f.config, &f.weights, 0, 8).is_err());
}

#[test]
fn factory_builds_cpu_and_explains_a_missing_gpu() {
    use tandem::backend::{factory::create_backend, DeviceKind};
    let f = fixture("llama-bf16");
    for device in [DeviceKind::Cpu, DeviceKind::Auto] {
        let mut backend = create_backend(device, &f.config, &f.weights, 32, 4).unwrap();
        assert_eq!(backend.num_kv_blocks(), 4);
        assert_eq!(backend.kv_layout().block_size, 32);
        let (tokens, _) = generate(backend.as_mut(), &f.prompt, &[], &[3, 2, 1], 3);
        assert_eq!(tokens, f.tokens[..3]);
    }
    if tandem::backend::cuda::gpu_available() {
        println!("a GPU is present: the no-GPU error path is not exercised here");
        return;
    }
    let err = create_backend(DeviceKind::Cuda, &f.config, &f.weights, 32, 4)
        .err()
        .unwrap();
    assert!(err.to_string().contains("no CUDA GPU found"), "{err}");
}
