//! A mock OpenAI server with known timing: the first token `ttft` after the request, then one
//! token every `itl` (on an absolute schedule, so delays do not drift). Used by the tests, the
//! load-generator check, and as the stand-in for `vllm serve` (`tandem mock-server serve ...`).
//! Each token is the word ` w<N>`, one token for word-level tokenizers.

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde::Deserialize;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct MockConfig {
    pub ttft: Duration,
    pub itl: Duration,
    /// The model name in responses.
    pub model: String,
}

/// Counters the tests read (also served at `GET /mock/stats`).
#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicUsize,
    pub active: AtomicUsize,
}

pub struct MockServer {
    pub addr: SocketAddr,
    pub stats: Arc<MockStats>,
    task: tokio::task::JoinHandle<()>,
}

impl MockServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct AppState {
    cfg: MockConfig,
    stats: Arc<MockStats>,
}

/// Binds `addr` (port 0 picks a free port) and serves until the returned handle is dropped.
pub async fn start(addr: SocketAddr, cfg: MockConfig) -> anyhow::Result<MockServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    // Tokens are small writes: without TCP_NODELAY, Nagle holds them back behind unacked ones.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let stats = Arc::new(MockStats::default());
    let app = router(Arc::new(AppState {
        cfg,
        stats: stats.clone(),
    }));
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("mock server stopped: {e}");
        }
    });
    Ok(MockServer { addr, stats, task })
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/models", get(models))
        .route("/mock/stats", get(stats))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .with_state(state)
}

async fn models(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"object": "list", "data": [{"id": s.cfg.model, "object": "model"}]}))
}

async fn stats(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "requests": s.stats.requests.load(Ordering::Relaxed),
        "active": s.stats.active.load(Ordering::Relaxed),
    }))
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    stream: bool,
    max_tokens: Option<usize>,
    min_tokens: Option<usize>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

async fn chat(State(s): State<Arc<AppState>>, Json(b): Json<Body>) -> Response {
    respond(s, b, true).await
}

async fn completions(State(s): State<Arc<AppState>>, Json(b): Json<Body>) -> Response {
    respond(s, b, false).await
}

fn token_text(i: usize) -> String {
    format!(" w{}", (i * 7) % 50)
}

/// Decrements the active count when the response (or its stream) is dropped.
struct ActiveGuard(Arc<MockStats>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn respond(s: Arc<AppState>, b: Body, chat: bool) -> Response {
    let start = Instant::now();
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    s.stats.active.fetch_add(1, Ordering::Relaxed);
    let guard = ActiveGuard(s.stats.clone());
    let n = b
        .max_tokens
        .unwrap_or(16)
        .max(b.min_tokens.unwrap_or(0))
        .max(1);
    let (ttft, itl, model) = (s.cfg.ttft, s.cfg.itl, s.cfg.model.clone());
    if !b.stream {
        tokio::time::sleep_until(start + ttft + itl * (n as u32 - 1)).await;
        let text: String = (0..n).map(token_text).collect();
        let choice = if chat {
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            serde_json::json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        drop(guard);
        return Json(serde_json::json!({
            "id": "mock", "object": if chat { "chat.completion" } else { "text_completion" },
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n},
        }))
        .into_response();
    }
    let usage = b.stream_options.is_some_and(|o| o.include_usage);
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choice: serde_json::Value| {
        let v = serde_json::json!({"id": "mock", "object": object, "model": model, "choices": [choice]});
        Ok::<_, Infallible>(Event::default().data(v.to_string()))
    };
    let stream = async_stream::stream! {
        let _guard = guard;
        if chat {
            // Like vLLM: a role-only chunk first; TTFT is measured to the first content.
            yield chunk(serde_json::json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}));
        }
        for i in 0..n {
            tokio::time::sleep_until(start + ttft + itl * i as u32).await;
            let finish = if i + 1 == n { serde_json::json!("length") } else { serde_json::Value::Null };
            let text = token_text(i);
            yield chunk(if chat {
                serde_json::json!({"index": 0, "delta": {"content": text}, "finish_reason": finish})
            } else {
                serde_json::json!({"index": 0, "text": text, "finish_reason": finish})
            });
        }
        if usage {
            let v = serde_json::json!({"id": "mock", "object": object, "choices": [],
                "usage": {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}});
            yield Ok(Event::default().data(v.to_string()));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(stream).into_response()
}
