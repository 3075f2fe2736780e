//! Many concurrent streams through the frontend and router: none lost, nothing left in flight.

mod frontend_support;

use frontend_support::{hammer, metric_sum};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tandem::frontend::mock::{MockConfig, MockWorker, TestServer};
use tandem::frontend::router::RouterMode;
use tandem::frontend::FrontendConfig;
use tandem::worker::WorkerClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_over_mock_workers() {
    let config = MockConfig {
        token_delay: Duration::from_millis(5),
        blocks_per_request: 2,
        ..Default::default()
    };
    let mocks: Vec<_> = (0..4)
        .map(|i| MockWorker::new(&format!("w{i}"), config.clone()))
        .collect();
    let workers = mocks
        .iter()
        .map(|m| m.clone() as Arc<dyn WorkerClient>)
        .collect();
    let server = TestServer::start(
        workers,
        FrontendConfig::new("mock", 1024),
        RouterMode::LeastLoaded,
        None,
    )
    .await;
    let ok = hammer(&server.url, 1000, 8).await;
    assert_eq!(ok, 1000, "every stream completes");
    let started: Vec<usize> = mocks
        .iter()
        .map(|m| m.counters.started.load(Ordering::SeqCst))
        .collect();
    assert_eq!(started.iter().sum::<usize>(), 1000);
    assert!(
        started.iter().all(|&n| n > 100),
        "least-loaded spreads the load: {started:?}"
    );
    assert!(mocks
        .iter()
        .all(|m| m.counters.live.load(Ordering::SeqCst) == 0));
    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_sum(&metrics, "tandem_requests_total{status=\"200\"}"),
        1000.0
    );
    assert_eq!(metric_sum(&metrics, "tandem_kv_blocks_active{"), 0.0);
    assert_eq!(metric_sum(&metrics, "tandem_router_in_flight{"), 0.0);
}
