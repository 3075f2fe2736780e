//! `tandem worker` processes on etcd + NATS with the tiny CPU model: remote prefill gives the
//! tokens of an aggregated engine, also when the KV is cut for a TP2 destination.

mod disagg_support;

use clap::Parser;
use disagg_support::{model_flags, spawn_worker, start_servers, Servers};
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::cli::common::{EngineArgs, ModelArgs};
use tandem::engine::types::{GenerateRequest, SamplingParams};
use tandem::engine::EngineHandle;
use tandem::runtime::distributed::{DistributedConfig, DistributedRuntime};
use tandem::runtime::{DiscoveryEvent, Runtime};
use tandem::worker::remote::RemoteWorker;
use tandem::worker::WorkerClient;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

/// An aggregated engine in this process with the workers' model and flags.
fn reference_engine() -> EngineHandle {
    let flags = Flags::parse_from(std::iter::once("ref".to_string()).chain(model_flags()));
    tandem::cli::worker::build_engine(&flags.model, &flags.engine)
        .unwrap()
        .0
}

async fn connect(servers: &Servers, namespace: &str) -> Arc<dyn Runtime> {
    let config = DistributedConfig {
        namespace: namespace.into(),
        lease_ttl: Duration::from_secs(2),
        ..DistributedConfig::new(&servers.etcd_url, &servers.nats_url)
    };
    Arc::new(DistributedRuntime::connect(&config).await.unwrap())
}

async fn wait_registered(rt: &Arc<dyn Runtime>, ids: &[&str]) {
    let mut events = rt.watch().await.unwrap();
    let mut missing: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(DiscoveryEvent::Up(i))) => {
                missing.remove(&i.id);
            }
            Ok(Some(_)) => {}
            _ => panic!("workers never registered: {missing:?}"),
        }
    }
}

pub fn request(id: &str, prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    let params = SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    GenerateRequest {
        id: id.into(),
        prompt_tokens: prompt,
        params,
    }
}

pub fn prompt(seed: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 31 + seed * 97 + 5) % 500) as u32)
        .collect()
}

pub async fn tokens_of(worker: &dyn WorkerClient, req: GenerateRequest) -> Vec<u32> {
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

async fn wait_no_active_blocks(worker: &RemoteWorker) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = worker.metrics();
        if m.kv_blocks_total > 0 && m.kv_blocks_active == 0 && m.running == 0 && m.waiting == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: KV blocks still held: {m:?}",
            worker.id()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_greedy_tokens_equal_aggregated_tp1_and_tp_mismatched() {
    let Some(servers) = start_servers() else {
        return;
    };
    let ns = "same-tokens";
    let _prefill = spawn_worker(&servers, ns, "prefill", "prefill-0", &[]);
    let _tp1 = spawn_worker(
        &servers,
        ns,
        "decode",
        "decode-tp1",
        &["--no-conditional-disagg"],
    );
    let _tp2 = spawn_worker(
        &servers,
        ns,
        "decode",
        "decode-tp2",
        &["--no-conditional-disagg", "--kv-ranks", "2"],
    );
    let rt = connect(&servers, ns).await;
    wait_registered(&rt, &["prefill-0", "decode-tp1", "decode-tp2"]).await;

    let reference = tandem::worker::LocalWorker::new("reference", reference_engine());
    let cases: Vec<(GenerateRequest, Vec<u32>)> = futures::future::join_all((0..6).map(|i| {
        let req = request(&format!("r{i}"), prompt(i, 20 + 57 * i), 12);
        let reference = reference.clone();
        async move {
            let want = tokens_of(&reference, req.clone()).await;
            (req, want)
        }
    }))
    .await;
    assert!(cases.iter().all(|(_, want)| want.len() == 12));

    let prefill = RemoteWorker::connect(rt.clone(), "prefill-0")
        .await
        .unwrap();
    for id in ["decode-tp1", "decode-tp2"] {
        let worker = RemoteWorker::connect(rt.clone(), id).await.unwrap();
        let steps_before = {
            tokio::time::sleep(Duration::from_millis(400)).await;
            prefill.metrics().steps
        };
        let runs = cases.iter().map(|(req, want)| {
            let worker = &worker;
            let req = GenerateRequest {
                id: format!("{id}-{}", req.id),
                ..req.clone()
            };
            async move { (tokens_of(worker, req).await, want.clone()) }
        });
        for (i, (got, want)) in futures::future::join_all(runs)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(got, want, "{id}, request {i}");
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            prefill.metrics().steps > steps_before,
            "{id}: the prefill worker computed nothing"
        );
        wait_no_active_blocks(&worker).await;
    }
    wait_no_active_blocks(&prefill).await;
}
