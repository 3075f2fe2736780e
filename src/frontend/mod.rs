//! The OpenAI-compatible HTTP frontend: request types, validation, the error → status mapping,
//! SSE streaming, the router that picks a worker, and `/metrics`.

pub mod deployment;
pub mod error;
pub mod generate;
pub mod kv_index;
pub mod metrics;
pub mod mock;
pub mod openai;
pub mod router;
pub mod routes;
pub mod sse;
pub mod tokenizer;
pub mod validate;

use metrics::FrontendMetrics;
use router::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokenizer::PromptTokenizer;
use validate::Limits;

#[derive(Debug, Clone)]
pub struct FrontendConfig {
    pub limits: Limits,
    /// Requests must send `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// From arrival to the last token.
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
}

impl FrontendConfig {
    pub fn new(served_model_name: &str, max_model_len: usize) -> Self {
        Self {
            limits: Limits {
                served_model_name: served_model_name.to_string(),
                max_model_len,
                max_choices: 64,
            },
            api_key: None,
            request_timeout: Duration::from_secs(600),
            max_body_bytes: 32 << 20,
        }
    }
}

pub struct AppState {
    pub config: FrontendConfig,
    pub router: Arc<Router>,
    pub tokenizer: Option<Arc<dyn PromptTokenizer>>,
    pub metrics: FrontendMetrics,
}

impl AppState {
    pub fn new(
        config: FrontendConfig,
        router: Arc<Router>,
        tokenizer: Option<Arc<dyn PromptTokenizer>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            router,
            tokenizer,
            metrics: FrontendMetrics::default(),
        })
    }
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Tokens are small writes: without TCP_NODELAY, Nagle holds each one until the previous is
    // acknowledged, and a keep-alive client's delayed ACK turns that into ~40 ms stalls.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, routes::app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` and returns the listener with the address it got (port 0 picks a free one).
pub async fn bind(addr: &str) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
