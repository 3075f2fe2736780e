//! The embedded disaggregated deployment (no etcd, no NATS) on the engine's mock backend, whose
//! outputs depend on every KV slot it reads: a missing or misplaced block changes the tokens.

use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::engine::mock_backend::MockBackend;
use tandem::engine::types::{GenerateRequest, SamplingParams};
use tandem::engine::{Engine, EngineConfig, EngineHandle};
use tandem::worker::decode::DecodeConfig;
use tandem::worker::deployment::{start_embedded, EmbeddedSpec, EmbeddedTransport};
use tandem::worker::prefill::PrefillConfig;
use tandem::worker::WorkerClient;

const VOCAB: usize = 1024;
const BLOCK: usize = 4;

fn engine(step_delay: Duration, remote_timeout: Duration) -> EngineHandle {
    let backend = MockBackend::new(VOCAB, BLOCK, 128).with_step_delay(step_delay);
    let config = EngineConfig {
        max_num_batched_tokens: 256,
        remote_prefill_timeout: remote_timeout,
        max_model_len: Some(256),
        ..Default::default()
    };
    Engine::start(Box::new(backend), None, config)
}

fn always_remote() -> DecodeConfig {
    DecodeConfig {
        conditional_disagg: false,
        ..Default::default()
    }
}

fn spec(
    prefill: Vec<EngineHandle>,
    decode: Vec<EngineHandle>,
    config: DecodeConfig,
    transport: EmbeddedTransport,
) -> EmbeddedSpec {
    EmbeddedSpec {
        agg: vec![],
        prefill,
        decode,
        decode_config: config,
        prefill_config: PrefillConfig::default(),
        transport,
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + seed * 101 + 7) % VOCAB as u32)
        .collect()
}

fn request(id: &str, prompt: Vec<u32>) -> GenerateRequest {
    let params = SamplingParams {
        max_tokens: 6,
        ignore_eos: true,
        ..Default::default()
    };
    GenerateRequest {
        id: id.into(),
        prompt_tokens: prompt,
        params,
    }
}

async fn tokens_of(worker: &Arc<dyn WorkerClient>, req: GenerateRequest) -> Vec<u32> {
    let mut stream = worker.generate(req).await.expect("accepted");
    let mut tokens = Vec::new();
    while let Some(piece) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("no output in 30 s")
    {
        tokens.extend(piece.expect("no error").token_ids);
    }
    tokens
}

/// Runs `n` requests at once, prompts of 5 to 5+3n tokens, and checks every output.
async fn run_and_check(worker: &Arc<dyn WorkerClient>, n: u32, first_len: usize) {
    let runs = (0..n).map(|i| {
        let p = prompt(i, first_len + 3 * i as usize);
        let want = MockBackend::reference_greedy(&p, 6, VOCAB, &[]);
        let worker = worker.clone();
        async move {
            (
                tokens_of(&worker, request(&format!("req-{i}"), p)).await,
                want,
            )
        }
    });
    for (i, (got, want)) in futures::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(got, want, "request {i}");
    }
}

fn assert_blocks_free(engines: &[&EngineHandle]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    for e in engines {
        while e.metrics().kv_blocks_active != 0 || e.metrics().running != 0 {
            assert!(
                Instant::now() < deadline,
                "KV blocks leaked: {:?}",
                e.metrics()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_prefill_gives_the_aggregated_tokens_in_process_and_over_tcp() {
    for transport in [EmbeddedTransport::InProcess, EmbeddedTransport::Tcp] {
        let (p, d) = (
            engine(Duration::ZERO, Duration::from_secs(30)),
            engine(Duration::ZERO, Duration::from_secs(30)),
        );
        let deployment = start_embedded(spec(
            vec![p.clone()],
            vec![d.clone()],
            always_remote(),
            transport,
        ))
        .await
        .unwrap();
        assert_eq!(deployment.workers.len(), 1);
        run_and_check(&deployment.workers[0], 8, 5).await;
        assert!(
            p.metrics().steps > 0,
            "{transport:?}: the prefill engine never ran"
        );
        assert_blocks_free(&[&p, &d]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_disaggregation_keeps_short_prompts_local() {
    let (p, d) = (
        engine(Duration::ZERO, Duration::from_secs(30)),
        engine(Duration::ZERO, Duration::from_secs(30)),
    );
    let config = DecodeConfig {
        max_local_prefill_length: 16,
        ..Default::default()
    };
    let deployment = start_embedded(spec(
        vec![p.clone()],
        vec![d.clone()],
        config,
        EmbeddedTransport::InProcess,
    ))
    .await
    .unwrap();
    let worker = &deployment.workers[0];
    let short = prompt(1, 12);
    assert_eq!(
        tokens_of(worker, request("short", short.clone())).await,
        MockBackend::reference_greedy(&short, 6, VOCAB, &[])
    );
    assert_eq!(
        p.metrics().steps,
        0,
        "a short prompt went to the prefill worker"
    );
    let long = prompt(2, 40);
    assert_eq!(
        tokens_of(worker, request("long", long.clone())).await,
        MockBackend::reference_greedy(&long, 6, VOCAB, &[])
    );
    assert!(
        p.metrics().steps > 0,
        "a long prompt was not prefilled remotely"
    );
    // The same long prompt again: 10 of its blocks are in the decode worker's prefix cache, so
    // only a few tokens are left to compute, and it stays local.
    let steps = p.metrics().steps;
    assert_eq!(
        tokens_of(worker, request("again", long.clone())).await,
        MockBackend::reference_greedy(&long, 6, VOCAB, &[])
    );
    assert_eq!(
        p.metrics().steps,
        steps,
        "a prefix-cache hit was prefilled remotely"
    );
    assert_blocks_free(&[&p, &d]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_stopped_prefill_worker_are_redelivered() {
    // A slow prefill worker takes the jobs, then "dies" with them in flight.
    let slow = engine(Duration::from_millis(400), Duration::from_secs(30));
    let d = engine(Duration::ZERO, Duration::from_secs(30));
    let deployment = start_embedded(spec(
        vec![slow.clone()],
        vec![d.clone()],
        always_remote(),
        EmbeddedTransport::InProcess,
    ))
    .await
    .unwrap();
    let worker = deployment.workers[0].clone();
    let t0 = Instant::now();
    let runs = tokio::spawn(async move { run_and_check(&worker, 4, 8).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    deployment.stop_prefill_workers();
    // A second prefill worker gets the jobs again.
    let fresh = engine(Duration::ZERO, Duration::from_secs(30));
    deployment.add_prefill_worker("prefill-second", fresh.clone());
    runs.await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "completed only by the decode side's timeout"
    );
    assert!(
        fresh.metrics().steps > 0,
        "the second prefill worker did nothing"
    );
    assert_blocks_free(&[&d, &fresh]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_prefill_workers_the_decode_worker_prefills_after_its_timeout() {
    let (p, d) = (
        engine(Duration::ZERO, Duration::from_secs(30)),
        engine(Duration::ZERO, Duration::from_secs(1)),
    );
    let deployment = start_embedded(spec(
        vec![p.clone()],
        vec![d.clone()],
        always_remote(),
        EmbeddedTransport::InProcess,
    ))
    .await
    .unwrap();
    deployment.stop_prefill_workers();
    let t0 = Instant::now();
    run_and_check(&deployment.workers[0], 3, 6).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "finished before the remote-prefill timeout"
    );
    assert_eq!(p.metrics().steps, 0);
    assert_blocks_free(&[&d]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_worker_drops_jobs_whose_decode_side_stopped_waiting() {
    use tandem::runtime::Runtime;
    use tandem::worker::protocol::PREFILL_QUEUE;
    let d = engine(Duration::ZERO, Duration::from_millis(500));
    let deployment = start_embedded(spec(
        vec![engine(Duration::ZERO, Duration::from_secs(30))],
        vec![d.clone()],
        always_remote(),
        EmbeddedTransport::InProcess,
    ))
    .await
    .unwrap();
    // No prefill worker while the requests come: their jobs wait in the queue past the decode
    // side's timeout, and the decode worker prefills them itself.
    deployment.stop_prefill_workers();
    run_and_check(&deployment.workers[0], 3, 6).await;
    let queued = deployment.runtime.queue_len(PREFILL_QUEUE).await.unwrap();
    assert_eq!(queued, 3, "the three jobs wait in the queue");
    // A prefill worker that comes now takes the stale jobs and drops them unprefilled.
    let late = engine(Duration::ZERO, Duration::from_secs(30));
    deployment.add_prefill_worker("prefill-late", late.clone());
    let t0 = Instant::now();
    while deployment.runtime.queue_len(PREFILL_QUEUE).await.unwrap() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "stale jobs never taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(late.metrics().steps, 0, "a stale job was prefilled");
    assert_blocks_free(&[&d, &late]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_free_their_parked_blocks() {
    let (p, d) = (
        engine(Duration::from_millis(300), Duration::from_secs(30)),
        engine(Duration::ZERO, Duration::from_secs(30)),
    );
    let deployment = start_embedded(spec(
        vec![p.clone()],
        vec![d.clone()],
        always_remote(),
        EmbeddedTransport::InProcess,
    ))
    .await
    .unwrap();
    let worker = &deployment.workers[0];
    let streams: Vec<_> = futures::future::join_all(
        (0..4).map(|i| worker.generate(request(&format!("c{i}"), prompt(i, 30)))),
    )
    .await;
    assert!(d.metrics().kv_blocks_active > 0, "nothing parked");
    drop(streams); // the clients go away while the prefills run
                   // The late KV writes are refused and every block on both sides comes back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_blocks_free(&[&p, &d]);
    // And the worker still serves.
    run_and_check(worker, 2, 9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_worker_runs_queued_prompts_together_in_one_step() {
    // A slow step lets the queue fill while the first prompt runs.
    let backend = MockBackend::new(VOCAB, BLOCK, 256).with_step_delay(Duration::from_millis(60));
    let log = backend.log();
    let config = EngineConfig {
        max_num_batched_tokens: 256,
        max_model_len: Some(256),
        ..Default::default()
    };
    let p = Engine::start(Box::new(backend), None, config);
    let d = engine(Duration::ZERO, Duration::from_secs(30));
    let deployment = start_embedded(spec(
        vec![p.clone()],
        vec![d.clone()],
        always_remote(),
        EmbeddedTransport::InProcess,
    ))
    .await
    .unwrap();
    run_and_check(&deployment.workers[0], 6, 10).await;
    let widest = log
        .lock()
        .iter()
        .map(|step| step.iter().filter(|c| c.start_pos == 0).count())
        .max()
        .unwrap_or(0);
    assert!(
        widest >= 2,
        "no step prefilled two prompts together (widest: {widest})"
    );
    assert_blocks_free(&[&p, &d]);
}

/// Workers served on the in-process runtime and reached through discovery, as the distributed
/// frontend reaches them: requests are balanced, and a worker that goes away is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_client_balances_over_served_workers_and_survives_one_leaving() {
    use tandem::runtime::local::LocalRuntime;
    use tandem::runtime::Runtime;
    use tandem::worker::protocol::{WorkerInfo, WorkerRole};
    use tandem::worker::remote::{DirectoryClient, WorkerDirectory};
    use tandem::worker::service::serve_worker;
    use tandem::worker::LocalWorker;

    let rt: Arc<dyn Runtime> = Arc::new(LocalRuntime::new());
    let info = WorkerInfo {
        role: WorkerRole::Agg,
        model: "mock".into(),
        block_size: BLOCK,
    };
    let (e0, e1) = (
        engine(Duration::ZERO, Duration::from_secs(30)),
        engine(Duration::ZERO, Duration::from_secs(30)),
    );
    let s0 = serve_worker(
        rt.clone(),
        Arc::new(LocalWorker::new("w0", e0.clone())),
        &info,
    )
    .await
    .unwrap();
    let _s1 = serve_worker(
        rt.clone(),
        Arc::new(LocalWorker::new("w1", e1.clone())),
        &info,
    )
    .await
    .unwrap();
    let directory = WorkerDirectory::watch(rt.clone()).await.unwrap();
    directory.wait_for(2, Duration::from_secs(5)).await.unwrap();
    let client: Arc<dyn WorkerClient> = Arc::new(DirectoryClient::new(directory));
    run_and_check(&client, 8, 5).await;
    assert!(
        e0.metrics().steps > 0 && e1.metrics().steps > 0,
        "one worker got nothing"
    );

    drop(s0); // w0 stops serving and deregisters
    let steps = e0.metrics().steps;
    tokio::time::sleep(Duration::from_millis(200)).await;
    run_and_check(&client, 4, 7).await;
    assert_eq!(
        e0.metrics().steps,
        steps,
        "a request went to the worker that left"
    );
    assert_blocks_free(&[&e0, &e1]);
}

/// After a remote prefill the decode worker streams one token per step, as after a local one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stream_step_by_step_after_a_remote_prefill() {
    let p = engine(Duration::ZERO, Duration::from_secs(30));
    let d = engine(Duration::from_millis(30), Duration::from_secs(30));
    let deployment = start_embedded(spec(
        vec![p.clone()],
        vec![d.clone()],
        always_remote(),
        EmbeddedTransport::InProcess,
    ))
    .await
    .unwrap();
    let mut stream = deployment.workers[0]
        .generate(request("s", prompt(3, 20)))
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    while let Some(piece) = stream.next().await {
        arrivals.push((Instant::now(), piece.unwrap().token_ids.len()));
    }
    assert!(p.metrics().steps > 0);
    let counts: Vec<usize> = arrivals.iter().map(|a| a.1).collect();
    assert_eq!(counts.iter().sum::<usize>(), 6);
    assert!(arrivals.len() >= 5, "tokens came in bursts: {counts:?}");
    let gaps: Vec<u128> = arrivals
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_millis())
        .collect();
    assert!(
        gaps.iter().skip(1).all(|&g| g >= 20),
        "pieces not a step apart: {gaps:?}"
    );
}
