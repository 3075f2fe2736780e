//! The engine on the CPU backend and the tiny-llama preset (dummy weights): batching, chunked
//! prefill, prefix caching and preemption never change greedy tokens.

mod engine_support;

use engine_support::*;
use tandem::backend::cpu::CpuBackend;
use tandem::engine::types::GenerateRequest;
use tandem::engine::{Engine, EngineConfig, EngineHandle};
use tandem::model::{load_weights, LoadFormat, ModelFiles};

const BLOCK_SIZE: usize = 16;

fn cpu_engine(num_blocks: usize, config: EngineConfig) -> EngineHandle {
    let files = ModelFiles::resolve("tiny-llama").expect("the tiny-llama preset");
    let weights = load_weights(&files, LoadFormat::Dummy, 0).unwrap();
    let backend = CpuBackend::new(&files.config, &weights, BLOCK_SIZE, num_blocks).unwrap();
    Engine::start(Box::new(backend), files.tokenizer.clone(), config)
}

fn requests(n: usize) -> Vec<GenerateRequest> {
    let mut rng = Lcg(11);
    let shared: Vec<u32> = (0..40).map(|_| rng.below(500) as u32).collect();
    (0..n)
        .map(|i| {
            // Half share a 40-token prefix (prefix-cache hits), all have a random tail.
            let mut prompt = if i % 2 == 0 { shared.clone() } else { vec![] };
            let tail = 1 + rng.below(50) as usize;
            prompt.extend((0..tail).map(|_| rng.below(500) as u32));
            greedy(&i.to_string(), prompt, 4 + rng.below(12) as usize)
        })
        .collect()
}

async fn all_at_once(e: &EngineHandle, reqs: &[GenerateRequest]) -> Vec<Collected> {
    let streams: Vec<_> = reqs
        .iter()
        .map(|r| e.generate(r.clone()).unwrap())
        .collect();
    futures::future::join_all(streams.into_iter().map(collect))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_greedy_requests_match_each_alone() {
    let reqs = requests(64);
    let alone_engine = cpu_engine(
        64,
        EngineConfig {
            enable_prefix_caching: false,
            ..Default::default()
        },
    );
    let mut alone = vec![];
    for r in &reqs {
        alone.push(run(&alone_engine, r.clone()).await);
    }
    assert_all_blocks_free(&alone_engine);
    // The outputs depend on the context (else this test could not see a KV bug).
    let distinct: std::collections::HashSet<_> = alone.iter().map(|c| c.tokens.clone()).collect();
    assert!(
        distinct.len() > 48,
        "only {} distinct outputs",
        distinct.len()
    );

    let configs = [
        (
            "chunked + prefix cache",
            EngineConfig {
                max_num_batched_tokens: 96,
                ..Default::default()
            },
        ),
        (
            "no chunking, no prefix cache",
            EngineConfig {
                enable_chunked_prefill: false,
                enable_prefix_caching: false,
                ..Default::default()
            },
        ),
        (
            "small budget, prefix cache",
            EngineConfig {
                max_num_batched_tokens: 24,
                max_num_seqs: 16,
                ..Default::default()
            },
        ),
    ];
    for (name, config) in configs {
        // 48 blocks of 16 cannot hold all 64 at once: preemption happens too.
        let e = cpu_engine(48, config);
        let outs = all_at_once(&e, &reqs).await;
        for (i, (got, want)) in outs.iter().zip(&alone).enumerate() {
            assert_eq!(got.tokens, want.tokens, "{name}: request {i}");
            assert_eq!(got.text, want.text, "{name}: request {i}");
        }
        if !name.starts_with("small") {
            assert!(e.metrics().num_preemptions > 0, "{name}: meant to preempt");
        }
        if name.contains("prefix") && !name.contains("no prefix") {
            assert!(
                e.metrics().prefix_hit_rate > 0.1,
                "{name}: {:?}",
                e.metrics()
            );
        }
        assert_all_blocks_free(&e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_requests_with_random_cancellations() {
    use futures::StreamExt;
    let mut rng = Lcg(99);
    let reqs: Vec<GenerateRequest> = (0..500)
        .map(|i| {
            let len = 1 + rng.below(60) as usize;
            let prompt = (0..len).map(|_| rng.below(500) as u32).collect();
            greedy(&i.to_string(), prompt, 1 + rng.below(16) as usize)
        })
        .collect();
    let cancel_after: Vec<Option<usize>> = reqs
        .iter()
        .map(|r| (rng.below(4) == 0).then(|| rng.below(r.params.max_tokens as u64) as usize))
        .collect();
    let reference = cpu_engine(64, EngineConfig::default());
    let mut alone = vec![];
    for r in &reqs {
        alone.push(run(&reference, r.clone()).await.tokens);
    }
    let e = cpu_engine(
        40,
        EngineConfig {
            max_num_batched_tokens: 256,
            max_num_seqs: 64,
            ..Default::default()
        },
    );
    let tasks: Vec<_> = reqs
        .iter()
        .zip(&cancel_after)
        .map(|(r, &cancel)| {
            let mut stream = e.generate(r.clone()).unwrap();
            tokio::spawn(async move {
                let mut tokens = vec![];
                while Some(tokens.len()) != cancel {
                    let Some(out) = stream.next().await else {
                        break;
                    };
                    let out = out.unwrap();
                    tokens.extend(out.token_ids);
                    if out.finish_reason.is_some() {
                        break;
                    }
                }
                tokens
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap();
        match cancel_after[i] {
            None => assert_eq!(got, alone[i], "request {i}"),
            Some(_) => assert_eq!(got[..], alone[i][..got.len()], "request {i} (cancelled)"),
        }
    }
    assert_all_blocks_free(&e);
    assert!(
        e.metrics().num_preemptions > 0,
        "40 blocks were meant to run short"
    );
}
