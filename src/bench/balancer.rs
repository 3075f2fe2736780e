//! Tandem's least-connections HTTP load balancer (the guide put nginx `least_conn` in front of
//! its `vllm serve` instances). Each request goes to the upstream with the fewest requests in
//! flight; ties rotate. A request stays counted until its response body is fully sent or dropped.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use axum::Router;
use futures::StreamExt;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Biggest request body forwarded (prompts of a few thousand tokens are far below it).
const MAX_BODY: usize = 64 << 20;

#[derive(Debug)]
pub struct Upstream {
    pub base_url: String,
    pub active: AtomicUsize,
    pub served: AtomicUsize,
}

pub struct Balancer {
    pub addr: SocketAddr,
    pub upstreams: Arc<Vec<Upstream>>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Requests sent to each upstream so far.
    pub fn served(&self) -> Vec<usize> {
        self.upstreams
            .iter()
            .map(|u| u.served.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    upstreams: Arc<Vec<Upstream>>,
    pick_lock: Mutex<usize>,
    client: reqwest::Client,
}

impl Shared {
    /// The least-loaded upstream (ties: the first after the previous pick), already counted.
    fn pick(&self) -> usize {
        let mut last = self.pick_lock.lock();
        let n = self.upstreams.len();
        let best = (1..=n)
            .map(|k| (*last + k) % n)
            .min_by_key(|&i| self.upstreams[i].active.load(Ordering::Relaxed))
            .expect("at least one upstream");
        self.upstreams[best].active.fetch_add(1, Ordering::Relaxed);
        self.upstreams[best].served.fetch_add(1, Ordering::Relaxed);
        *last = best;
        best
    }
}

struct InFlight(Arc<Vec<Upstream>>, usize);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0[self.1].active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds `addr` (port 0: any free port) and balances over `upstreams` (base URLs).
pub async fn start(addr: SocketAddr, upstreams: Vec<String>) -> anyhow::Result<Balancer> {
    anyhow::ensure!(
        !upstreams.is_empty(),
        "the balancer needs at least one upstream"
    );
    let upstreams: Arc<Vec<Upstream>> = Arc::new(
        upstreams
            .into_iter()
            .map(|u| Upstream {
                base_url: u.trim_end_matches('/').to_string(),
                active: AtomicUsize::new(0),
                served: AtomicUsize::new(0),
            })
            .collect(),
    );
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()?;
    let shared = Arc::new(Shared {
        upstreams: upstreams.clone(),
        pick_lock: Mutex::new(0),
        client,
    });
    let app = Router::new().fallback(forward).with_state(shared);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    // Tokens are small writes: without TCP_NODELAY, Nagle holds them back behind unacked ones.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("balancer stopped: {e}");
        }
    });
    Ok(Balancer {
        addr,
        upstreams,
        task,
    })
}

fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "proxy-connection"
            | "host"
            | "content-length"
    )
}

async fn forward(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("reading request body: {e}"),
            )
                .into_response()
        }
    };
    let i = s.pick();
    let guard = InFlight(s.upstreams.clone(), i);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("{}{path}", s.upstreams[i].base_url);
    let mut upstream_req = s.client.request(parts.method, &url).body(body);
    for (name, value) in parts.headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        upstream_req = upstream_req.header(name, value);
    }
    let upstream = match upstream_req.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("upstream {url}: {e}")).into_response(),
    };
    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers().iter().filter(|(n, _)| !hop_by_hop(n)) {
        response = response.header(name, value);
    }
    // The guard rides along with the body: the request stays in flight until it is done.
    let stream = upstream.bytes_stream().map(move |chunk| {
        let _in_flight = &guard;
        chunk
    });
    response
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("building response: {e}"),
            )
                .into_response()
        })
}
