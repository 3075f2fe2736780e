//! The CPU backend's paged-KV contract on a fixture checkpoint: batching, KV export/import,
//! device sampling, bad batches, the factory.

mod cpu_support;
use cpu_support::*;
use tandem::backend::cpu::CpuBackend;
use tandem::backend::{Backend, Batch, DeviceSampling, Emit, SeqChunk, SeqOutput};

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
    // Together: one backend, disjoint block tables. Sequence 1 prefills in chunks of 20 (the
    // first ones emit nothing) and sequence 2 starts a step later, so steps mix prefill chunks,
    // silent chunks and decode tokens at different positions.
    let mut backend = CpuBackend::new(&f.config, &f.weights, bs, 64).unwrap();
    let tables: Vec<Vec<u32>> = (0..3u32)
        .map(|s| {
            (0..((prompts[s as usize].len() + steps).div_ceil(bs)) as u32)
                .map(|b| b * 3 + s)
                .collect()
        })
        .collect();
    let chunk_len = [usize::MAX, 20, usize::MAX];
    let mut prefilled = [0usize; 3];
    let mut tokens: Vec<Vec<u32>> = vec![vec![]; 3];
    let mut logits: Vec<Vec<Vec<f32>>> = vec![vec![]; 3];
    for step in 0..20 {
        let mut seqs = vec![];
        for s in 0..3 {
            if (s == 2 && step == 0) || tokens[s].len() == steps {
                continue;
            }
            let len = prompts[s].len();
            let chunk = if prefilled[s] < len {
                let (start, end) = (
                    prefilled[s],
                    len.min(prefilled[s].saturating_add(chunk_len[s])),
                );
                prefilled[s] = end;
                SeqChunk {
                    tokens: prompts[s][start..end].to_vec(),
                    start_pos: start,
                    block_table: tables[s].clone(),
                    emit: if end == len {
                        Emit::Logits
                    } else {
                        Emit::Nothing
                    },
                }
            } else {
                SeqChunk {
                    tokens: vec![*tokens[s].last().unwrap()],
                    start_pos: len + tokens[s].len() - 1,
                    block_table: tables[s].clone(),
                    emit: Emit::Logits,
                }
            };
            seqs.push((s, chunk));
        }
        if seqs.is_empty() {
            break;
        }
        let batch = Batch {
            seqs: seqs.iter().map(|(_, c)| c.clone()).collect(),
        };
        for ((s, chunk), out) in seqs.into_iter().zip(backend.step(&batch).unwrap()) {
            if chunk.emit == Emit::Nothing {
                assert_eq!(out, SeqOutput::Nothing);
                continue;
            }
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
fn factory_builds_the_cpu_backend() {
    use tandem::backend::{cuda::gpu_available, factory::create_backend, DeviceKind};
    let f = fixture("llama-bf16");
    let mut devices = vec![DeviceKind::Cpu];
    if !gpu_available() {
        devices.push(DeviceKind::Auto); // Auto falls back to the CPU
        let err = create_backend(DeviceKind::Cuda, &f.config, &f.weights, 32, 4).err();
        assert!(err.is_some(), "--device cuda without a GPU must fail");
    }
    for device in devices {
        let mut backend = create_backend(device, &f.config, &f.weights, 32, 4).unwrap();
        assert_eq!(backend.num_kv_blocks(), 4);
        assert_eq!(backend.kv_layout().block_size, 32);
        let (tokens, _) = generate(backend.as_mut(), &f.prompt, &[], &[3, 2, 1], 3);
        assert_eq!(tokens, f.tokens[..3]);
    }
}
