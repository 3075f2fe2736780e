//! Random mixes of completion, cancellation and preemption on the mock backend: outputs stay
//! exact, the token budget holds, admission is first come first served, and no block leaks.

mod engine_support;

use engine_support::*;
use futures::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use tandem::engine::mock_backend::{MockBackend, StepLog};
use tandem::engine::types::{GenerateRequest, SamplingParams};
use tandem::engine::{Engine, EngineConfig, EngineHandle};

struct Job {
    req: GenerateRequest,
    /// Drop the stream after this many pieces (None: run to the end).
    cancel_after: Option<usize>,
}

fn jobs(
    n: usize,
    seed: u64,
    max_prompt: u64,
    max_gen: u64,
    cancel_pct: u64,
    sampled_pct: u64,
) -> Vec<Job> {
    let mut rng = Lcg(seed);
    (0..n)
        .map(|i| {
            // A unique first token names the request in the backend's log.
            let mut prompt = vec![i as u32 % VOCAB as u32];
            let len = rng.below(max_prompt) as usize;
            prompt.extend(rng.tokens(len));
            let max_tokens = 1 + rng.below(max_gen) as usize;
            let mut params = SamplingParams {
                max_tokens,
                ignore_eos: true,
                ..Default::default()
            };
            if rng.below(100) < sampled_pct {
                params.temperature = 0.8;
                params.top_p = 0.9;
                params.seed = Some(rng.next());
            }
            let cancel_after =
                (rng.below(100) < cancel_pct).then(|| rng.below(max_tokens as u64) as usize);
            Job {
                req: GenerateRequest {
                    id: i.to_string(),
                    prompt_tokens: prompt,
                    params,
                },
                cancel_after,
            }
        })
        .collect()
}

/// Runs all jobs at once; returns the tokens each stream delivered.
async fn run_all(e: &EngineHandle, jobs: &[Job]) -> Vec<Vec<u32>> {
    let mut tasks = vec![];
    for job in jobs {
        let mut stream = e.generate(job.req.clone()).expect("accepted");
        let cancel_after = job.cancel_after;
        tasks.push(tokio::spawn(async move {
            let mut tokens = vec![];
            let mut pieces = 0;
            loop {
                if Some(pieces) == cancel_after {
                    return tokens; // drops the stream: cancels
                }
                let next = tokio::time::timeout(Duration::from_secs(30), stream.next()).await;
                match next.expect("stalled") {
                    Some(out) => {
                        let out = out.expect("no error");
                        tokens.extend(out.token_ids);
                        pieces += 1;
                        if out.finish_reason.is_some() {
                            return tokens;
                        }
                    }
                    None => panic!("stream ended without a finish reason"),
                }
            }
        }));
    }
    let mut out = vec![];
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Each job alone on a fresh engine that finishes every step before it schedules the next (a
/// backend that does not queue steps): the expected tokens.
async fn alone(jobs: &[Job], block_size: usize, num_blocks: usize) -> Vec<Vec<u32>> {
    let e = Engine::start(
        Box::new(MockBackend::new(VOCAB, block_size, num_blocks)),
        None,
        EngineConfig::default(),
    );
    let mut out = vec![];
    for j in jobs {
        out.push(run(&e, j.req.clone()).await.tokens);
    }
    out
}

fn check_log(log: &StepLog, budget: usize, max_seqs: usize, chunked: bool) -> HashMap<u32, usize> {
    let log = log.lock();
    let mut admissions: HashMap<u32, usize> = HashMap::new();
    let mut first_order = vec![];
    for step in log.iter() {
        let tokens: usize = step.iter().map(|c| c.tokens.len()).sum();
        assert!(
            tokens <= budget,
            "step of {tokens} tokens over budget {budget}"
        );
        assert!(step.len() <= max_seqs, "{} sequences in a step", step.len());
        for c in step.iter().filter(|c| c.start_pos == 0) {
            let n = admissions.entry(c.tokens[0]).or_default();
            if *n == 0 {
                first_order.push(c.tokens[0]);
            }
            *n += 1;
        }
        if !chunked {
            assert!(
                step.iter().all(|c| c.emit),
                "a partial prefill chunk with chunking off"
            );
        }
    }
    assert!(
        first_order.windows(2).all(|w| w[0] < w[1]),
        "admission out of arrival order: {first_order:?}"
    );
    admissions
}

async fn mix(config: EngineConfig, block_size: usize, num_blocks: usize, jobs: Vec<Job>) -> usize {
    let expected = alone(&jobs, block_size, num_blocks).await;
    let backend = MockBackend::new(VOCAB, block_size, num_blocks).with_queued_steps();
    let log = backend.log();
    let taken = backend.previous_taken();
    let async_scheduling = config.async_scheduling;
    let (budget, max_seqs, chunked) = (
        config.max_num_batched_tokens,
        config.max_num_seqs,
        config.enable_chunked_prefill,
    );
    let e = Engine::start(Box::new(backend), None, config);
    let got = run_all(&e, &jobs).await;
    for ((job, got), want) in jobs.iter().zip(&got).zip(&expected) {
        match job.cancel_after {
            None => assert_eq!(got, want, "request {}", job.req.id),
            Some(_) => assert_eq!(
                got[..],
                want[..got.len()],
                "request {} (cancelled)",
                job.req.id
            ),
        }
    }
    assert_all_blocks_free(&e);
    // Async scheduling ran decodes whose input token the engine had not read yet.
    let taken = taken.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(async_scheduling, taken > 0, "{taken} previous tokens taken");
    let preemptions = e.metrics().num_preemptions;
    let admissions = check_log(&log, budget, max_seqs, chunked);
    let readmitted = admissions.values().filter(|&&n| n > 1).count();
    assert!(readmitted as u64 <= preemptions);
    readmitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_cancellation_and_completion_mix() {
    // 40 blocks of 4 tokens: far fewer than the requests want at once, so preemption happens.
    let config = EngineConfig {
        max_num_batched_tokens: 16,
        max_num_seqs: 12,
        ..Default::default()
    };
    let preempted = mix(config, 4, 40, jobs(80, 1, 40, 40, 25, 30)).await;
    assert!(preempted > 0, "the workload was meant to cause preemption");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mix_without_prefix_caching_or_chunked_prefill() {
    let config = EngineConfig {
        max_num_batched_tokens: 96,
        max_num_seqs: 6,
        enable_chunked_prefill: false,
        enable_prefix_caching: false,
        max_model_len: Some(80),
        ..Default::default()
    };
    mix(config, 4, 30, jobs(60, 2, 40, 40, 20, 30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mix_with_every_step_read_before_the_next() {
    let config = EngineConfig {
        max_num_batched_tokens: 16,
        max_num_seqs: 12,
        async_scheduling: false,
        ..Default::default()
    };
    let preempted = mix(config, 4, 40, jobs(80, 1, 40, 40, 25, 30)).await;
    assert!(preempted > 0, "the workload was meant to cause preemption");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_requests_with_random_cancellations() {
    let config = EngineConfig {
        max_num_batched_tokens: 256,
        max_num_seqs: 64,
        ..Default::default()
    };
    mix(config, 8, 300, jobs(500, 3, 100, 50, 20, 20)).await;
}
