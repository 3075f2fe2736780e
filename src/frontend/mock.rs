//! A fake worker for HTTP and router tests: deterministic tokens at a configurable pace, injected
//! failures, and counters that show whether a dropped stream was noticed (cancellation).

use crate::engine::types::{
    EngineError, EngineMetrics, FinishReason, GenerateOutput, GenerateRequest, TokenLogprob, Usage,
};
use crate::worker::{OutputStream, WorkerClient};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    pub first_token_delay: Duration,
    pub token_delay: Duration,
    /// The token the mock emits as EOS at this output position (0-based), unless `ignore_eos`.
    pub eos: Option<(usize, u32)>,
    /// `generate` fails with this error.
    pub fail_on_start: Option<EngineError>,
    /// The stream fails with this error after this many tokens.
    pub fail_after: Option<(usize, EngineError)>,
    /// Requests alive at once before `generate` answers `QueueFull`.
    pub max_live: Option<usize>,
    /// Blocks charged per live request in `metrics()`.
    pub blocks_per_request: usize,
}

#[derive(Debug, Default)]
pub struct MockCounters {
    pub started: AtomicUsize,
    pub finished: AtomicUsize,
    /// Streams dropped before their last token.
    pub cancelled: AtomicUsize,
    pub live: AtomicUsize,
}

pub struct MockWorker {
    id: String,
    config: MockConfig,
    pub counters: Arc<MockCounters>,
    pub requests: Mutex<Vec<GenerateRequest>>,
}

impl MockWorker {
    pub fn new(id: &str, config: MockConfig) -> Arc<Self> {
        Arc::new(Self {
            id: id.to_string(),
            config,
            counters: Arc::default(),
            requests: Mutex::new(vec![]),
        })
    }

    /// The i-th output token for a prompt: a pure function, so tests can predict it.
    pub fn token_at(prompt: &[u32], i: usize) -> u32 {
        let last = prompt.last().copied().unwrap_or(0);
        100 + (last + i as u32) % 50
    }

    pub fn text_of(token: u32) -> String {
        format!("t{token} ")
    }
}

/// Counts the stream as finished or cancelled when it is dropped.
struct LiveGuard {
    counters: Arc<MockCounters>,
    done: bool,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.counters.live.fetch_sub(1, Ordering::SeqCst);
        let counter = if self.done {
            &self.counters.finished
        } else {
            &self.counters.cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

impl WorkerClient for MockWorker {
    fn id(&self) -> &str {
        &self.id
    }

    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<OutputStream, EngineError>> {
        let config = self.config.clone();
        let counters = self.counters.clone();
        self.requests.lock().push(req.clone());
        Box::pin(async move {
            if let Some(e) = config.fail_on_start.clone() {
                return Err(e);
            }
            let live = counters.live.fetch_add(1, Ordering::SeqCst);
            if config.max_live.is_some_and(|m| live >= m) {
                counters.live.fetch_sub(1, Ordering::SeqCst);
                return Err(EngineError::QueueFull(live));
            }
            counters.started.fetch_add(1, Ordering::SeqCst);
            let guard = LiveGuard {
                counters,
                done: false,
            };
            let stream = async_stream::stream! {
                // Moved in whole so that dropping the stream drops the guard.
                let mut guard = guard;
                let p = &req.params;
                let prompt_tokens = req.prompt_tokens.len();
                tokio::time::sleep(config.first_token_delay).await;
                for i in 0..p.max_tokens {
                    if i > 0 {
                        tokio::time::sleep(config.token_delay).await;
                    }
                    if let Some((after, e)) = &config.fail_after {
                        if i == *after {
                            guard.done = true;
                            yield Err(e.clone());
                            return;
                        }
                    }
                    let eos = config.eos.filter(|&(at, _)| at == i && !p.ignore_eos && i >= p.min_tokens);
                    let token = eos.map(|(_, t)| t).unwrap_or_else(|| MockWorker::token_at(&req.prompt_tokens, i));
                    let stop = eos.is_some() || (p.stop_token_ids.contains(&token) && i >= p.min_tokens);
                    let finish_reason = if stop {
                        Some(FinishReason::Stop)
                    } else if i + 1 == p.max_tokens {
                        Some(FinishReason::Length)
                    } else {
                        None
                    };
                    let logprobs = p
                        .logprobs
                        .map(|n| {
                            let top = (0..n as u32).map(|k| (token + k, -(k as f32) - 0.5)).collect();
                            vec![TokenLogprob { token_id: token, logprob: -0.5, top }]
                        })
                        .unwrap_or_default();
                    if finish_reason.is_some() {
                        guard.done = true;
                    }
                    yield Ok(GenerateOutput {
                        token_ids: vec![token],
                        text: if eos.is_some() { String::new() } else { MockWorker::text_of(token) },
                        logprobs,
                        finish_reason,
                        usage: Usage { prompt_tokens, completion_tokens: i + 1, cached_tokens: 0 },
                    });
                    if finish_reason.is_some() {
                        return;
                    }
                }
            };
            Ok(Box::pin(stream) as OutputStream)
        })
    }

    fn metrics(&self) -> EngineMetrics {
        let live = self.counters.live.load(Ordering::SeqCst);
        EngineMetrics {
            running: live,
            kv_blocks_total: 1000,
            kv_blocks_active: live * self.config.blocks_per_request,
            ..Default::default()
        }
    }
}

/// A frontend on a free local port over the given workers, for HTTP tests.
pub struct TestServer {
    pub url: String,
    pub state: Arc<super::AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start(
        workers: Vec<Arc<dyn WorkerClient>>,
        config: super::FrontendConfig,
        mode: super::router::RouterMode,
        tokenizer: Option<Arc<dyn super::tokenizer::PromptTokenizer>>,
    ) -> Self {
        let router = Arc::new(super::router::Router::new(
            workers,
            super::router::RouterConfig::new(mode, 16),
        ));
        let state = super::AppState::new(config, router, tokenizer);
        let (listener, addr) = super::bind("127.0.0.1:0").await.expect("bind a local port");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let serve_state = state.clone();
        tokio::spawn(async move {
            let _ = super::serve(listener, serve_state, async move {
                let _ = rx.await;
            })
            .await;
        });
        Self {
            url: format!("http://{addr}"),
            state,
            shutdown: Some(tx),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::SamplingParams;
    use futures::StreamExt;

    fn req(max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            id: "r".into(),
            prompt_tokens: vec![1, 2],
            params: SamplingParams {
                max_tokens,
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn streams_then_counts_finish_or_cancel() {
        let w = MockWorker::new("w", MockConfig::default());
        let outs: Vec<_> = w.generate(req(3)).await.unwrap().collect().await;
        assert_eq!(outs.len(), 3);
        assert_eq!(
            outs[2].as_ref().unwrap().finish_reason,
            Some(FinishReason::Length)
        );
        assert_eq!(w.counters.finished.load(Ordering::SeqCst), 1);

        let mut s = w.generate(req(5)).await.unwrap();
        s.next().await.unwrap().unwrap();
        drop(s);
        assert_eq!(w.counters.cancelled.load(Ordering::SeqCst), 1);
        assert_eq!(w.counters.live.load(Ordering::SeqCst), 0);
    }
}
