//! The sweep against the mock server with known delays, synthetic prompts, and the
//! least-connections balancer.

mod bench_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tandem::bench::artifacts::{self, JSON_FILE};
use tandem::bench::client::{EndpointType, HttpTarget};
use tandem::bench::mock_server::{self, MockConfig, MockServer};
use tandem::bench::prompts::{BenchTokenizer, PromptGenerator, PromptShape};
use tandem::bench::{balancer, run_sweep, SweepConfig};

async fn mock(ttft_ms: u64, itl_ms: u64) -> MockServer {
    let cfg = MockConfig {
        ttft: Duration::from_millis(ttft_ms),
        itl: Duration::from_millis(itl_ms),
        model: "mock".into(),
    };
    mock_server::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
}

fn sweep_config(dir: &std::path::Path, concurrencies: Vec<usize>) -> SweepConfig {
    SweepConfig {
        model: "org/mock".into(),
        endpoint_name: "chat".into(),
        shape: PromptShape {
            isl_mean: 40,
            isl_stddev: 0.0,
        },
        osl: 10,
        concurrencies,
        warmup_request_count: None,
        request_count: None,
        random_seed: 100,
        artifact_dir: dir.to_path_buf(),
        overwrite: false,
        progress: false,
        input_config: serde_json::json!({}),
    }
}

fn within(measured: f64, expected: f64, tolerance: f64, what: &str) {
    let err = (measured - expected).abs() / expected;
    assert!(
        err <= tolerance,
        "{what}: measured {measured:.3}, expected {expected:.3} (error {:.1}%)",
        err * 100.0
    );
}

#[test]
fn prompts_have_exact_token_counts_and_differ() {
    let dir = tempfile::tempdir().unwrap();
    bench_common::write_word_tokenizer(dir.path());
    let tok = BenchTokenizer::load(dir.path()).unwrap();
    let shape = PromptShape {
        isl_mean: 300,
        isl_stddev: 0.0,
    };
    let prompts = PromptGenerator::new(Some(&tok), shape, 100)
        .unwrap()
        .prompts(24)
        .unwrap();
    for p in &prompts {
        assert_eq!(tok.count(&p.text).unwrap(), 300);
        assert_eq!(p.token_ids.len(), 300);
        assert_eq!(p.input_tokens, 300);
    }
    let distinct: std::collections::HashSet<&str> =
        prompts.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(distinct.len(), 24, "every prompt is distinct");
    // Seeded: the same seed gives the same prompts, another seed others.
    let again = PromptGenerator::new(Some(&tok), shape, 100)
        .unwrap()
        .prompts(24)
        .unwrap();
    assert_eq!(again, prompts);
    let other = PromptGenerator::new(Some(&tok), shape, 101)
        .unwrap()
        .next_prompt()
        .unwrap();
    assert_ne!(other.text, prompts[0].text);
    // With a standard deviation, lengths vary and each is still exact.
    let shape = PromptShape {
        isl_mean: 100,
        isl_stddev: 20.0,
    };
    let varied = PromptGenerator::new(Some(&tok), shape, 7)
        .unwrap()
        .prompts(20)
        .unwrap();
    let lens: std::collections::HashSet<usize> = varied.iter().map(|p| p.input_tokens).collect();
    assert!(lens.len() > 5, "{lens:?}");
    for p in &varied {
        assert_eq!(tok.count(&p.text).unwrap(), p.input_tokens);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_against_mock_reports_its_delays() {
    let server = mock(100, 20).await;
    let dir = tempfile::tempdir().unwrap();
    let tok_dir = dir.path().join("tok");
    bench_common::write_word_tokenizer(&tok_dir);
    let tok = Arc::new(BenchTokenizer::load(&tok_dir).unwrap());
    let target = Arc::new(
        HttpTarget::new(
            &server.url(),
            "mock",
            EndpointType::Chat,
            Duration::from_secs(30),
        )
        .unwrap(),
    );
    let art = dir.path().join("art");
    let cfg = sweep_config(&art, vec![1, 4]);
    let results = run_sweep(target.clone(), Some(tok.clone()), &cfg)
        .await
        .unwrap();

    assert_eq!(results.len(), 2);
    // 2·C warm-up + 10·C measured requests per level.
    assert_eq!(server.stats.requests.load(Ordering::Relaxed), 12 + 48);
    for r in &results {
        let m = &r.metrics;
        assert_eq!(r.errors, 0);
        assert_eq!(m.avg("request_count"), 10.0 * r.concurrency as f64);
        within(m.avg("time_to_first_token"), 100.0, 0.05, "TTFT");
        within(m.avg("inter_token_latency"), 20.0, 0.05, "ITL");
        within(
            m.avg("output_token_throughput_per_user"),
            50.0,
            0.05,
            "tokens/s/user",
        );
        within(m.avg("request_latency"), 280.0, 0.05, "latency");
        assert_eq!(m.get("output_sequence_length", "min"), Some(10.0));
        assert_eq!(m.get("output_sequence_length", "max"), Some(10.0));
        assert_eq!(m.avg("input_sequence_length"), 40.0);
        // C streams of 10 tokens every 280 ms.
        within(
            m.avg("output_token_throughput"),
            r.concurrency as f64 * 10.0 / 0.28,
            0.10,
            "throughput",
        );
        // Artifacts parse back to what was reported.
        assert!(r
            .dir
            .ends_with(format!("org_mock-openai-chat-concurrency{}", r.concurrency)));
        let back = artifacts::read_level(&r.dir).unwrap();
        assert_eq!(back.metrics.len(), m.metrics.len());
        assert!((back.avg("inter_token_latency") - m.avg("inter_token_latency")).abs() < 1e-9);
    }

    // Resumable: existing levels are read back, not rerun; new levels run.
    let before = server.stats.requests.load(Ordering::Relaxed);
    let cfg = sweep_config(&art, vec![1, 2, 4]);
    let again = run_sweep(target.clone(), Some(tok.clone()), &cfg)
        .await
        .unwrap();
    assert!(again[0].resumed && !again[1].resumed && again[2].resumed);
    assert_eq!(server.stats.requests.load(Ordering::Relaxed) - before, 24);
    // --overwrite reruns.
    let cfg = SweepConfig {
        overwrite: true,
        request_count: Some(3),
        warmup_request_count: Some(0),
        ..sweep_config(&art, vec![1])
    };
    let rerun = run_sweep(target, Some(tok), &cfg).await.unwrap();
    assert!(!rerun[0].resumed);
    assert_eq!(rerun[0].metrics.avg("request_count"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_endpoint_and_counting_without_tokenizer() {
    let server = mock(10, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let target = Arc::new(
        HttpTarget::new(
            &server.url(),
            "mock",
            EndpointType::Completions,
            Duration::from_secs(30),
        )
        .unwrap(),
    );
    let mut cfg = sweep_config(dir.path(), vec![2]);
    cfg.endpoint_name = "completions".into();
    cfg.osl = 7;
    let results = run_sweep(target, None, &cfg).await.unwrap();
    let m = &results[0].metrics;
    // Without a tokenizer the server's usage.completion_tokens counts the output.
    assert_eq!(m.get("output_sequence_length", "avg"), Some(7.0));
    assert!(results[0]
        .dir
        .ends_with("org_mock-openai-completions-concurrency2"));
    assert!(results[0].dir.join(JSON_FILE).is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port: every request fails, and the sweep says why.
    let port = bench_common::free_port_pair();
    let url = format!("http://127.0.0.1:{port}");
    let target = Arc::new(
        HttpTarget::new(&url, "mock", EndpointType::Chat, Duration::from_secs(5)).unwrap(),
    );
    let err = run_sweep(target, None, &sweep_config(dir.path(), vec![1]))
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("all 10 requests failed") && msg.contains(&url),
        "{msg}"
    );
    assert!(!artifacts::level_dir(dir.path(), "org/mock", "chat", 1)
        .join(JSON_FILE)
        .exists());
}

async fn stream_to_end(url: String, osl: usize) {
    let body = serde_json::json!({"model": "mock", "stream": true, "max_tokens": osl,
        "messages": [{"role": "user", "content": "hi"}]});
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    resp.bytes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_sends_to_least_connections() {
    let (a, b) = (mock(0, 50).await, mock(0, 50).await);
    let lb = balancer::start("127.0.0.1:0".parse().unwrap(), vec![a.url(), b.url()])
        .await
        .unwrap();
    // A long request occupies one upstream...
    let long = tokio::spawn(stream_to_end(lb.url(), 40));
    while a.stats.active.load(Ordering::Relaxed) + b.stats.active.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let busy = if a.stats.active.load(Ordering::Relaxed) == 1 {
        0
    } else {
        1
    };
    // ...so short requests, one after another, all go to the other one (round-robin would alternate).
    for _ in 0..3 {
        stream_to_end(lb.url(), 2).await;
    }
    let served = lb.served();
    assert_eq!(served[busy], 1, "{served:?}");
    assert_eq!(served[1 - busy], 3, "{served:?}");
    long.await.unwrap();
    // Idle again: ties rotate, so concurrent requests spread evenly.
    let before = lb.served();
    let burst: Vec<_> = (0..6)
        .map(|_| tokio::spawn(stream_to_end(lb.url(), 3)))
        .collect();
    for t in burst {
        t.await.unwrap();
    }
    let served = lb.served();
    assert_eq!(
        (served[0] - before[0], served[1] - before[1]),
        (3, 3),
        "{before:?} → {served:?}"
    );
    assert_eq!(
        lb.upstreams
            .iter()
            .map(|u| u.active.load(Ordering::Relaxed))
            .sum::<usize>(),
        0
    );
    // A GET passes through too.
    let health = reqwest::get(format!("{}/health", lb.url())).await.unwrap();
    assert!(health.status().is_success());
}

/// A worker that streams one token after `ttft`, then one every `itl`, with empty text.
struct FakeWorker {
    ttft: Duration,
    itl: Duration,
    seen_params: std::sync::Mutex<Vec<tandem::engine::types::SamplingParams>>,
}

impl tandem::worker::WorkerClient for FakeWorker {
    fn id(&self) -> &str {
        "fake"
    }
    fn generate(
        &self,
        req: tandem::engine::types::GenerateRequest,
    ) -> futures::future::BoxFuture<
        'static,
        Result<tandem::worker::OutputStream, tandem::engine::types::EngineError>,
    > {
        use tandem::engine::types::{FinishReason, GenerateOutput, Usage};
        self.seen_params.lock().unwrap().push(req.params.clone());
        let (ttft, itl, n) = (self.ttft, self.itl, req.params.max_tokens);
        Box::pin(async move {
            let start = tokio::time::Instant::now();
            let s = async_stream::stream! {
                for i in 0..n {
                    tokio::time::sleep_until(start + ttft + itl * i as u32).await;
                    yield Ok(GenerateOutput {
                        token_ids: vec![7],
                        text: String::new(),
                        logprobs: vec![],
                        finish_reason: (i + 1 == n).then_some(FinishReason::Length),
                        usage: Usage::default(),
                    });
                }
            };
            Ok(Box::pin(s) as tandem::worker::OutputStream)
        })
    }
    fn metrics(&self) -> tandem::engine::types::EngineMetrics {
        Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_target_is_measured_like_http() {
    let worker = Arc::new(FakeWorker {
        ttft: Duration::from_millis(60),
        itl: Duration::from_millis(15),
        seen_params: Default::default(),
    });
    let target =
        Arc::new(tandem::bench::inprocess::WorkerTarget::new(vec![worker.clone()]).unwrap());
    let dir = tempfile::tempdir().unwrap();
    bench_common::write_word_tokenizer(&dir.path().join("tok"));
    let tok = Arc::new(BenchTokenizer::load(&dir.path().join("tok")).unwrap());
    let results = run_sweep(target, Some(tok), &sweep_config(dir.path(), vec![2]))
        .await
        .unwrap();
    let m = &results[0].metrics;
    within(m.avg("time_to_first_token"), 60.0, 0.05, "TTFT");
    within(m.avg("inter_token_latency"), 15.0, 0.05, "ITL");
    assert_eq!(
        m.avg("output_sequence_length"),
        10.0,
        "exact token counts from the worker"
    );
    let params = worker.seen_params.lock().unwrap();
    assert_eq!(params.len(), 24);
    assert!(params
        .iter()
        .all(|p| p.max_tokens == 10 && p.min_tokens == 10 && p.ignore_eos));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_end_to_end_on_the_tiny_model() {
    use tandem::bench::demo::{self, DemoConfig, AGG_DIR, DISAGG_DIR};
    use tandem::bench::inprocess::LocalDeployment;
    let dir = tempfile::tempdir().unwrap();
    let cfg = DemoConfig {
        deployment: LocalDeployment {
            model: "tiny-llama".into(),
            load_format: tandem::model::LoadFormat::Dummy,
            device: tandem::backend::DeviceKind::Cpu,
            block_size: 16,
            seed: 0,
            engine: tandem::engine::EngineConfig {
                enable_prefix_caching: false,
                ..Default::default()
            },
            num_kv_blocks: Some(256),
            gpu_memory_utilization: 0.9,
            replicas: 2,
        },
        concurrencies: vec![1, 2],
        isl: 32,
        osl: 8,
        request_count: Some(4),
        output_dir: dir.path().to_path_buf(),
        progress: false,
    };
    let outcome = demo::run(&cfg).await.unwrap();
    assert_eq!(outcome.aggregated.len(), 2);
    assert_eq!(outcome.disaggregated.len(), 2);
    for level in outcome.aggregated.iter().chain(&outcome.disaggregated) {
        assert_eq!(level.metrics.avg("request_count"), 4.0);
        assert_eq!(level.metrics.avg("output_sequence_length"), 8.0);
        assert_eq!(level.metrics.avg("input_sequence_length"), 32.0);
    }
    for sub in [AGG_DIR, DISAGG_DIR] {
        let run = artifacts::level_dir(&dir.path().join(sub), "tiny-llama", "chat", 2);
        assert!(run.join(JSON_FILE).is_file(), "{}", run.display());
    }
    let disagg = tandem::bench::DeploymentConfig::read(&dir.path().join(DISAGG_DIR)).unwrap();
    assert_eq!((disagg.mode.as_str(), disagg.gpus()), ("disaggregated", 2));
    assert!(dir.path().join("pareto_plot.png").is_file());
    assert!(dir.path().join("results.csv").is_file());
    assert!(outcome.report.contains("tok/s/gpu"), "{}", outcome.report);
    assert!(
        outcome
            .report
            .contains("disaggregated (1 prefill + 1 decode) (2 GPUs) vs aggregated"),
        "{}",
        outcome.report
    );
}

/// A target that answers every request at once with `osl` one-token chunks and keeps the prompts.
#[derive(Default)]
struct RecordingTarget {
    prompts: std::sync::Mutex<Vec<String>>,
}

impl tandem::bench::LoadTarget for RecordingTarget {
    fn stream(
        &self,
        prompt: &tandem::bench::prompts::Prompt,
        osl: usize,
    ) -> futures::future::BoxFuture<'static, anyhow::Result<tandem::bench::ChunkStream>> {
        self.prompts.lock().unwrap().push(prompt.text.clone());
        Box::pin(async move {
            let chunks = (0..osl).map(|_| {
                Ok(tandem::bench::Chunk {
                    text: "w".into(),
                    tokens: Some(1),
                    completion_tokens: None,
                })
            });
            Ok(Box::pin(futures::stream::iter(chunks)) as tandem::bench::ChunkStream)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_send_prompts_of_their_own_and_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    bench_common::write_word_tokenizer(&dir.path().join("tok"));
    let tok = Arc::new(BenchTokenizer::load(&dir.path().join("tok")).unwrap());
    let sent = |run: &str| {
        let (tok, path) = (tok.clone(), dir.path().join(run));
        async move {
            let target = Arc::new(RecordingTarget::default());
            run_sweep(
                target.clone(),
                Some(tok),
                &sweep_config(&path, vec![1, 2, 4]),
            )
            .await
            .unwrap();
            let prompts = target.prompts.lock().unwrap().clone();
            prompts
        }
    };
    let first = sent("a").await;
    assert_eq!(first.len(), 12 + 24 + 48, "12·C prompts a level");
    let distinct: std::collections::HashSet<&String> = first.iter().collect();
    assert_eq!(
        distinct.len(),
        first.len(),
        "no prompt repeats, within a level or across levels"
    );
    let mut again = sent("b").await;
    let mut first_sorted = first.clone();
    first_sorted.sort();
    again.sort();
    assert_eq!(again, first_sorted, "the same seed sends the same prompts");
}
