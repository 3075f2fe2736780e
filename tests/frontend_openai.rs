//! The official OpenAI Python client against our server (tests/openai_client.py).
//! Needs `.venv` with `openai` (`.ci/run` makes it): a panic under CI without it, a skip otherwise.

mod frontend_support;

use frontend_support::{openai_python, run_client};
use std::sync::Arc;
use tandem::frontend::mock::{MockConfig, MockWorker, TestServer};
use tandem::frontend::router::RouterMode;
use tandem::frontend::tokenizer::ByteTokenizer;
use tandem::frontend::FrontendConfig;
use tandem::worker::WorkerClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_against_mock_workers() {
    let Some(python) = openai_python() else {
        return;
    };
    let workers: Vec<Arc<dyn WorkerClient>> = (0..2)
        .map(|i| MockWorker::new(&format!("w{i}"), MockConfig::default()) as Arc<dyn WorkerClient>)
        .collect();
    let server = TestServer::start(
        workers,
        FrontendConfig::new("mock-model", 4096),
        RouterMode::KvAware,
        Some(Arc::new(ByteTokenizer)),
    )
    .await;
    let url = server.url.clone();
    let summary = tokio::task::spawn_blocking(move || run_client(&python, &url, "mock-model"))
        .await
        .unwrap();
    let ids: Vec<u32> =
        serde_json::from_value(summary["ids_completion_token_ids"].clone()).unwrap();
    let prompt = [1, 45, 74, 31, 34, 33];
    let expected: Vec<u32> = (0..12).map(|i| MockWorker::token_at(&prompt, i)).collect();
    assert_eq!(ids, expected);
}
