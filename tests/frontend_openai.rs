//! The official OpenAI Python client against our server (tests/openai_client.py).
//! Needs `.venv` with `openai` (`.ci/run` makes it): a panic under CI without it, a skip otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tandem::frontend::mock::{MockConfig, MockWorker, TestServer};
use tandem::frontend::router::RouterMode;
use tandem::frontend::tokenizer::ByteTokenizer;
use tandem::frontend::FrontendConfig;
use tandem::worker::WorkerClient;

/// The venv's python with `openai` importable, or `None` (skip) outside CI.
fn openai_python() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = python.exists()
        && Command::new(&python)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    let why = format!(
        "{} with the `openai` package is missing (run .ci/run)",
        python.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    println!("SKIPPED: {why}");
    None
}

/// Runs the client script against `url`; returns its JSON summary.
pub fn run_client(python: &Path, url: &str, model: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .args([url, model])
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("the script's JSON summary")
}

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
    let prompt = [1, 450, 7483, 310, 3444, 338];
    let expected: Vec<u32> = (0..12).map(|i| MockWorker::token_at(&prompt, i)).collect();
    assert_eq!(ids, expected);
}
