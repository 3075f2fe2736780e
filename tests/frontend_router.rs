//! Router policies over mock workers: round-robin, random, least-loaded, KV-aware, failover,
//! and workers joining and leaving.

use std::sync::Arc;
use tandem::engine::types::{EngineError, GenerateRequest, SamplingParams};
use tandem::frontend::mock::{MockConfig, MockWorker};
use tandem::frontend::router::{Router, RouterConfig, RouterMode};
use tandem::worker::WorkerClient;

fn workers(n: usize, config: MockConfig) -> Vec<Arc<MockWorker>> {
    (0..n)
        .map(|i| MockWorker::new(&format!("w{i}"), config.clone()))
        .collect()
}

fn router(ws: &[Arc<MockWorker>], mode: RouterMode, block_size: usize) -> Router {
    let clients = ws
        .iter()
        .map(|w| w.clone() as Arc<dyn WorkerClient>)
        .collect();
    Router::new(clients, RouterConfig::new(mode, block_size))
}

fn req(prompt: Vec<u32>) -> GenerateRequest {
    GenerateRequest {
        id: "r".into(),
        prompt_tokens: prompt,
        params: SamplingParams {
            max_tokens: 4,
            ..Default::default()
        },
    }
}

fn counts(ws: &[Arc<MockWorker>]) -> Vec<usize> {
    ws.iter().map(|w| w.requests.lock().len()).collect()
}

#[tokio::test]
async fn round_robin_takes_turns() {
    let ws = workers(3, MockConfig::default());
    let r = router(&ws, RouterMode::RoundRobin, 4);
    for _ in 0..6 {
        drop(r.generate(req(vec![1])).await.unwrap());
    }
    assert_eq!(counts(&ws), [2, 2, 2]);
}

#[tokio::test]
async fn random_reaches_every_worker() {
    let ws = workers(3, MockConfig::default());
    let r = router(&ws, RouterMode::Random, 4);
    for _ in 0..300 {
        drop(r.generate(req(vec![1])).await.unwrap());
    }
    let c = counts(&ws);
    assert_eq!(c.iter().sum::<usize>(), 300);
    assert!(c.iter().all(|&n| n > 50), "{c:?}");
}

#[tokio::test]
async fn least_loaded_avoids_busy_workers_and_forgets_dropped_streams() {
    let ws = workers(2, MockConfig::default());
    let r = router(&ws, RouterMode::LeastLoaded, 4);
    let a = r.generate(req(vec![1])).await.unwrap();
    let busy = counts(&ws).iter().position(|&n| n == 1).unwrap();
    let b = r.generate(req(vec![1])).await.unwrap();
    assert_eq!(
        counts(&ws),
        [1, 1],
        "the second request goes to the idle worker"
    );
    let loads = r.loads();
    assert_eq!(
        loads.iter().map(|l| l.in_flight).collect::<Vec<_>>(),
        [1, 1]
    );
    drop(a);
    let _c = r.generate(req(vec![1])).await.unwrap();
    assert_eq!(
        ws[busy].requests.lock().len(),
        2,
        "the freed worker is least loaded again"
    );
    drop(b);
    drop(_c);
    assert!(r.loads().iter().all(|l| l.in_flight == 0));
}

#[tokio::test]
async fn kv_aware_follows_the_prefix_until_load_outweighs_it() {
    let ws = workers(2, MockConfig::default());
    let r = router(&ws, RouterMode::KvAware, 4);
    let shared: Vec<u32> = (0..32).collect();
    drop(r.generate(req(shared.clone())).await.unwrap());
    let home = counts(&ws).iter().position(|&n| n == 1).unwrap();
    for k in 0..5 {
        let mut p = shared.clone();
        p.extend([1000 + k, 7, 7, 7]);
        drop(r.generate(req(p)).await.unwrap());
        assert_eq!(
            ws[home].requests.lock().len(),
            2 + k as usize,
            "request {k} follows its prefix"
        );
    }
    // Hold enough blocks on the home worker that prefilling 8 blocks elsewhere is cheaper.
    let mut held = vec![];
    for _ in 0..3 {
        let mut r2 = req(shared.clone());
        r2.params.max_tokens = 64;
        held.push(r.generate(r2).await.unwrap());
    }
    let before = ws[1 - home].requests.lock().len();
    drop(r.generate(req(shared.clone())).await.unwrap());
    assert_eq!(
        ws[1 - home].requests.lock().len(),
        before + 1,
        "load outweighs overlap"
    );
}

#[tokio::test]
async fn unavailable_workers_are_skipped() {
    let down = MockConfig {
        fail_on_start: Some(EngineError::Unavailable("gone".into())),
        ..Default::default()
    };
    let ws = vec![
        MockWorker::new("w0", down),
        MockWorker::new("w1", MockConfig::default()),
    ];
    let r = router(&ws, RouterMode::RoundRobin, 4);
    for _ in 0..4 {
        drop(r.generate(req(vec![1])).await.unwrap());
    }
    assert_eq!(counts(&ws), [1, 4], "w0 was tried once, then skipped");
    assert!(!r.loads()[0].available && r.loads()[1].available);

    let all_down = MockConfig {
        fail_on_start: Some(EngineError::Unavailable("gone".into())),
        ..Default::default()
    };
    let ws = workers(2, all_down);
    let r = router(&ws, RouterMode::RoundRobin, 4);
    assert!(matches!(
        r.generate(req(vec![1])).await,
        Err(EngineError::Unavailable(_))
    ));
}

#[tokio::test]
async fn workers_can_join_and_leave() {
    let ws = workers(2, MockConfig::default());
    let r = router(&ws[..1], RouterMode::RoundRobin, 4);
    r.add_worker(ws[1].clone());
    for _ in 0..4 {
        drop(r.generate(req(vec![1])).await.unwrap());
    }
    assert_eq!(counts(&ws), [2, 2]);
    assert!(r.remove_worker("w0"));
    assert!(!r.remove_worker("w0"));
    for _ in 0..2 {
        drop(r.generate(req(vec![1])).await.unwrap());
    }
    assert_eq!(counts(&ws), [2, 4]);
    assert_eq!(r.loads().len(), 1);
    r.remove_worker("w1");
    assert!(matches!(
        r.generate(req(vec![1])).await,
        Err(EngineError::Unavailable(_))
    ));
}

#[tokio::test]
async fn other_errors_are_returned_without_retry() {
    let full = MockConfig {
        fail_on_start: Some(EngineError::QueueFull(9)),
        ..Default::default()
    };
    let ws = workers(2, full);
    let r = router(&ws, RouterMode::RoundRobin, 4);
    assert_eq!(
        r.generate(req(vec![1])).await.err(),
        Some(EngineError::QueueFull(9))
    );
    assert_eq!(counts(&ws).iter().sum::<usize>(), 1);
    assert!(r.loads().iter().all(|l| l.available));
}
