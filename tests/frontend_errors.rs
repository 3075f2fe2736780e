//! Every bad input and failure gets its status and an OpenAI error body, the server stays up,
//! and a client that goes away cancels its request in the worker.

use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tandem::engine::types::EngineError;
use tandem::frontend::mock::{MockConfig, MockWorker, TestServer};
use tandem::frontend::router::RouterMode;
use tandem::frontend::tokenizer::{ByteTokenizer, PromptTokenizer};
use tandem::frontend::FrontendConfig;
use tandem::worker::WorkerClient;

async fn server_with(
    mock: MockConfig,
    config: FrontendConfig,
    tokenizer: bool,
) -> (TestServer, Arc<MockWorker>) {
    let worker = MockWorker::new("w0", mock);
    let tok = tokenizer.then(|| Arc::new(ByteTokenizer) as Arc<dyn PromptTokenizer>);
    let s = TestServer::start(
        vec![worker.clone() as Arc<dyn WorkerClient>],
        config,
        RouterMode::RoundRobin,
        tok,
    )
    .await;
    (s, worker)
}

async fn server(mock: MockConfig) -> (TestServer, Arc<MockWorker>) {
    server_with(mock, FrontendConfig::new("mock", 64), true).await
}

async fn send(s: &TestServer, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", s.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

/// Asserts the status and an OpenAI error body whose message contains every `needles`.
async fn expect_error(s: &TestServer, path: &str, body: &str, status: u16, needles: &[&str]) {
    let (got, v) = send(s, path, body.to_string()).await;
    assert_eq!(got, status, "{body} -> {v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message in {v}"));
    assert!(v["error"]["type"].is_string(), "{v}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} should mention {n:?}");
    }
}

async fn healthy(s: &TestServer) -> bool {
    reqwest::get(format!("{}/health", s.url))
        .await
        .unwrap()
        .status()
        == 200
}

#[tokio::test]
async fn bad_requests_get_400_404_413() {
    let (s, worker) = server(MockConfig::default()).await;
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    expect_error(&s, cmpl, "{not json", 400, &["invalid request body"]).await;
    expect_error(
        &s,
        cmpl,
        r#"{"prompt": [1], "temperature": "hot"}"#,
        400,
        &["invalid request body"],
    )
    .await;
    expect_error(&s, cmpl, r#"{"max_tokens": 3}"#, 400, &["prompt"]).await;
    expect_error(&s, chat, r#"{"messages": "hi"}"#, 400, &[]).await;
    expect_error(&s, cmpl, r#"{"prompt": [1], "top_p": 5}"#, 400, &["top_p"]).await;
    expect_error(
        &s,
        cmpl,
        r#"{"prompt": [1,2,3,4,5,6,7,8,9,10], "max_tokens": 60}"#,
        400,
        &["64", "60", "10"],
    )
    .await;
    expect_error(
        &s,
        cmpl,
        r#"{"prompt": [1], "model": "gpt-9"}"#,
        404,
        &["gpt-9"],
    )
    .await;
    expect_error(
        &s,
        chat,
        r#"{"messages": [{"role":"user","content":"x"}], "model": "gpt-9"}"#,
        404,
        &["gpt-9"],
    )
    .await;
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(33 << 20));
    let (status, v) = send(&s, cmpl, huge).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(
        worker.requests.lock().len(),
        0,
        "no bad request reached the worker"
    );
    let (status, v) = send(&s, "/v1/nothing", "{}").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    assert!(healthy(&s).await);
}

#[tokio::test]
async fn without_a_tokenizer_chat_is_400_and_completions_need_ids() {
    let (s, _) = server_with(
        MockConfig::default(),
        FrontendConfig::new("mock", 64),
        false,
    )
    .await;
    let chat = r#"{"messages": [{"role":"user","content":"x"}]}"#;
    expect_error(&s, "/v1/chat/completions", chat, 400, &["tokenizer"]).await;
    expect_error(
        &s,
        "/v1/completions",
        r#"{"prompt": "text"}"#,
        400,
        &["token ids"],
    )
    .await;
    let (status, v) = send(
        &s,
        "/v1/completions",
        r#"{"prompt": [4, 5], "max_tokens": 2}"#,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], "t105 t106 ", "the mock's own text");
}

#[tokio::test]
async fn engine_failures_map_to_429_500_503() {
    let body = r#"{"prompt": [1], "max_tokens": 4}"#;
    for (err, status) in [
        (EngineError::QueueFull(7), 429),
        (EngineError::Internal("cuda exploded".into()), 500),
        (EngineError::Unavailable("gone".into()), 503),
    ] {
        let (s, _) = server(MockConfig {
            fail_on_start: Some(err.clone()),
            ..Default::default()
        })
        .await;
        let (got, v) = send(&s, "/v1/completions", body.to_string()).await;
        assert_eq!(got, status, "{err:?} -> {v}");
        if status == 500 {
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("cuda exploded"));
        }
        // A stream that cannot start gets the status too, not a 200 with an error inside.
        let (got, _) = send(&s, "/v1/completions", r#"{"prompt": [1], "stream": true}"#).await;
        assert_eq!(got, status);
    }
    let (s, _) = server(MockConfig {
        max_live: Some(0),
        ..Default::default()
    })
    .await;
    expect_error(&s, "/v1/completions", body, 429, &["capacity"]).await;
}

#[tokio::test]
async fn failure_mid_stream_ends_with_an_error_event() {
    let fail = MockConfig {
        fail_after: Some((2, EngineError::Internal("step failed".into()))),
        ..Default::default()
    };
    let (s, _) = server(fail).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"prompt": [1], "max_tokens": 5, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.len(), 4, "{text}");
    let err: Value = serde_json::from_str(data[2]).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("step failed"),
        "{err}"
    );
    assert_eq!(data[3], "[DONE]");
    // The same failure without streaming is a 500.
    expect_error(
        &s,
        "/v1/completions",
        r#"{"prompt": [1], "max_tokens": 5}"#,
        500,
        &["step failed"],
    )
    .await;
    assert!(healthy(&s).await);
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    let mut config = FrontendConfig::new("mock", 64);
    config.api_key = Some("sekret".into());
    let (s, _) = server_with(MockConfig::default(), config, true).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/completions", s.url);
    let body = json!({"prompt": [1], "max_tokens": 1});
    let no_key = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(no_key.status(), 401);
    let wrong = client
        .post(&url)
        .bearer_auth("guess")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let v: Value = wrong.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let right = client
        .post(&url)
        .bearer_auth("sekret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    assert!(healthy(&s).await, "/health needs no key");
}

#[tokio::test]
async fn request_timeout_is_504_or_an_error_event() {
    let mut config = FrontendConfig::new("mock", 64);
    config.request_timeout = Duration::from_millis(300);
    let slow = MockConfig {
        token_delay: Duration::from_millis(100),
        ..Default::default()
    };
    let (s, worker) = server_with(slow, config, true).await;
    expect_error(
        &s,
        "/v1/completions",
        r#"{"prompt": [1], "max_tokens": 50}"#,
        504,
        &["timed out"],
    )
    .await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"prompt": [1], "max_tokens": 50, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert!(data.len() >= 2 && data.len() < 10, "{text}");
    assert!(data[data.len() - 2].contains("timed out"), "{text}");
    assert_eq!(data[data.len() - 1], "[DONE]");
    assert_eq!(
        worker.counters.live.load(Ordering::SeqCst),
        0,
        "timed-out requests are cancelled"
    );
}

/// Waits until `cond` holds, for at most 5 s.
async fn eventually(cond: impl Fn() -> bool) -> bool {
    for _ in 0..100 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn disconnect_cancels_the_request_in_the_worker() {
    let slow = MockConfig {
        token_delay: Duration::from_millis(20),
        ..Default::default()
    };
    let (s, worker) = server(slow).await;
    let c = &worker.counters;

    // Streaming: read one chunk, then hang up.
    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"prompt": [1], "max_tokens": 60, "stream": true}))
        .send()
        .await
        .unwrap();
    assert!(resp.chunk().await.unwrap().is_some());
    assert_eq!(c.live.load(Ordering::SeqCst), 1);
    drop(resp);
    assert!(
        eventually(|| c.cancelled.load(Ordering::SeqCst) == 1).await,
        "stream drop was not noticed"
    );
    assert_eq!(c.live.load(Ordering::SeqCst), 0);

    // Not streaming: the client gives up before the answer.
    let gave_up = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .timeout(Duration::from_millis(200))
        .json(&json!({"prompt": [1], "max_tokens": 60}))
        .send()
        .await;
    assert!(gave_up.is_err());
    assert!(
        eventually(|| c.cancelled.load(Ordering::SeqCst) == 2).await,
        "hang-up was not noticed"
    );
    assert_eq!(c.live.load(Ordering::SeqCst), 0);
    assert_eq!(c.finished.load(Ordering::SeqCst), 0);
    let metrics = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tandem_requests_total{status=\"499\"} 1"),
        "{metrics}"
    );
}
