//! Workers in other processes: a `WorkerClient` over the runtime's request plane, and the
//! directory of the workers that discovery lists.

use super::protocol::{generate_subject, metrics_subject, WorkerInfo};
use super::service::Chunk;
use super::{OutputStream, WorkerClient};
use crate::engine::types::{EngineError, EngineMetrics, GenerateRequest};
use crate::runtime::{DiscoveryEvent, Runtime};
use anyhow::Result;
use futures::future::BoxFuture;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

pub struct RemoteWorker {
    id: String,
    runtime: Arc<dyn Runtime>,
    metrics: Arc<Mutex<EngineMetrics>>,
    metrics_task: tokio::task::JoinHandle<()>,
}

impl Drop for RemoteWorker {
    fn drop(&mut self) {
        self.metrics_task.abort();
    }
}

impl RemoteWorker {
    pub async fn connect(runtime: Arc<dyn Runtime>, id: &str) -> Result<Self> {
        let metrics = Arc::new(Mutex::new(EngineMetrics::default()));
        let mut updates = runtime.subscribe(&metrics_subject(id)).await?;
        let m = metrics.clone();
        let metrics_task = tokio::spawn(async move {
            while let Some(bytes) = updates.next().await {
                if let Ok(snapshot) = serde_json::from_slice(&bytes) {
                    *m.lock() = snapshot;
                }
            }
        });
        Ok(Self {
            id: id.to_string(),
            runtime,
            metrics,
            metrics_task,
        })
    }
}

impl WorkerClient for RemoteWorker {
    fn id(&self) -> &str {
        &self.id
    }

    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<OutputStream, EngineError>> {
        let (runtime, id) = (self.runtime.clone(), self.id.clone());
        Box::pin(async move {
            let payload =
                serde_json::to_vec(&req).map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
            let unavailable =
                |e: anyhow::Error| EngineError::Unavailable(format!("worker {id}: {e:#}"));
            let mut chunks = runtime
                .request(&generate_subject(&id), payload)
                .await
                .map_err(unavailable)?;
            // The first chunk says whether the worker took the request: its errors (invalid
            // request, queue full...) come back from `generate` itself, as in-process.
            let first = match chunks.next().await {
                Some(Ok(bytes)) => decode(&bytes),
                Some(Err(e)) => Err(unavailable(e)),
                None => Err(EngineError::Internal(format!(
                    "worker {id} ended the response without output"
                ))),
            }?;
            let rest = chunks.map(move |c| match c {
                Ok(bytes) => decode(&bytes),
                Err(e) => Err(EngineError::Unavailable(format!("worker {id}: {e:#}"))),
            });
            let stream = futures::stream::once(async move { Ok(first) }).chain(rest);
            // Stop after the first error, as local streams do.
            let stream = stream.scan(false, |failed, item| {
                let out = if *failed { None } else { Some(item) };
                *failed = out.as_ref().is_some_and(|i| i.is_err());
                futures::future::ready(out)
            });
            Ok(Box::pin(stream) as OutputStream)
        })
    }

    fn metrics(&self) -> EngineMetrics {
        self.metrics.lock().clone()
    }
}

fn decode(bytes: &[u8]) -> Chunk {
    serde_json::from_slice::<Chunk>(bytes)
        .unwrap_or_else(|e| Err(EngineError::Internal(format!("malformed response: {e}"))))
}

/// The workers that take requests (roles agg and decode), kept current from discovery.
pub struct WorkerDirectory {
    workers: watch::Receiver<Vec<Arc<dyn WorkerClient>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WorkerDirectory {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WorkerDirectory {
    pub async fn watch(runtime: Arc<dyn Runtime>) -> Result<Self> {
        let mut events = runtime.watch().await?;
        let (tx, rx) = watch::channel(Vec::new());
        let task = tokio::spawn(async move {
            let mut known: BTreeMap<String, Arc<dyn WorkerClient>> = BTreeMap::new();
            while let Some(event) = events.next().await {
                match event {
                    DiscoveryEvent::Up(instance) => {
                        let Ok(info) = serde_json::from_slice::<WorkerInfo>(&instance.info) else {
                            continue;
                        };
                        if !info.role.serves_requests() || known.contains_key(&instance.id) {
                            continue;
                        }
                        match RemoteWorker::connect(runtime.clone(), &instance.id).await {
                            Ok(w) => {
                                tracing::info!(worker = instance.id, role = ?info.role, "worker joined");
                                known.insert(instance.id, Arc::new(w));
                            }
                            Err(e) => tracing::warn!("connecting to worker {}: {e:#}", instance.id),
                        }
                    }
                    DiscoveryEvent::Down(id) => {
                        if known.remove(&id).is_some() {
                            tracing::warn!(worker = id, "worker left");
                        }
                    }
                }
                let _ = tx.send(known.values().cloned().collect());
            }
        });
        Ok(Self { workers: rx, task })
    }

    /// The workers listed now.
    pub fn workers(&self) -> Vec<Arc<dyn WorkerClient>> {
        self.workers.borrow().clone()
    }

    /// Waits until at least `n` workers are listed, up to `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: std::time::Duration) -> Result<()> {
        let mut rx = self.workers.clone();
        tokio::time::timeout(timeout, rx.wait_for(|w| w.len() >= n))
            .await
            .map_err(|_| anyhow::anyhow!("fewer than {n} workers registered within {timeout:?}"))?
            .map_err(|_| anyhow::anyhow!("discovery stopped"))?;
        Ok(())
    }

    /// Changes of the list, for a router that follows it.
    pub fn subscribe(&self) -> watch::Receiver<Vec<Arc<dyn WorkerClient>>> {
        self.workers.clone()
    }
}

/// All the workers of a directory behind one `WorkerClient`: each request goes to the least
/// loaded listed worker (running + waiting, from their published metrics, plus what this client
/// has in flight there); a worker that answers `Unavailable` is skipped and the next one tried.
pub struct DirectoryClient {
    directory: WorkerDirectory,
    in_flight: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl DirectoryClient {
    pub fn new(directory: WorkerDirectory) -> Self {
        Self {
            directory,
            in_flight: Default::default(),
            next: Default::default(),
        }
    }

    pub fn directory(&self) -> &WorkerDirectory {
        &self.directory
    }

    fn load(&self, w: &Arc<dyn WorkerClient>) -> usize {
        let m = w.metrics();
        let mine = self.in_flight.lock().get(w.id()).copied().unwrap_or(0);
        (m.running + m.waiting).max(mine)
    }
}

impl WorkerClient for DirectoryClient {
    fn id(&self) -> &str {
        "directory"
    }

    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<OutputStream, EngineError>> {
        let mut workers = self.directory.workers();
        // Rotate first so that ties go to workers in turn.
        if !workers.is_empty() {
            let k = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % workers.len();
            workers.rotate_left(k);
        }
        let mut order: Vec<(usize, Arc<dyn WorkerClient>)> =
            workers.into_iter().map(|w| (self.load(&w), w)).collect();
        order.sort_by_key(|(load, _)| *load);
        let in_flight = self.in_flight.clone();
        Box::pin(async move {
            let mut last = EngineError::Unavailable("no worker is registered".into());
            for (_, worker) in order {
                match worker.generate(req.clone()).await {
                    Ok(stream) => {
                        let id = worker.id().to_string();
                        *in_flight.lock().entry(id.clone()).or_default() += 1;
                        let guard = InFlightGuard { id, in_flight };
                        return Ok(Box::pin(stream.map(move |item| {
                            let _keep = &guard;
                            item
                        })) as OutputStream);
                    }
                    Err(e @ EngineError::Unavailable(_)) => {
                        tracing::warn!(worker = worker.id(), "{e}; trying another worker");
                        last = e;
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(last)
        })
    }

    fn metrics(&self) -> EngineMetrics {
        let mut total = EngineMetrics::default();
        for w in self.directory.workers() {
            let m = w.metrics();
            total.waiting += m.waiting;
            total.running += m.running;
            total.kv_blocks_total += m.kv_blocks_total;
            total.kv_blocks_active += m.kv_blocks_active;
            total.generated_tokens_per_s += m.generated_tokens_per_s;
            total.steps += m.steps;
            total.last_step_ms = total.last_step_ms.max(m.last_step_ms);
        }
        total
    }
}

struct InFlightGuard {
    id: String,
    in_flight: Arc<Mutex<std::collections::HashMap<String, usize>>>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut map = self.in_flight.lock();
        if let Some(n) = map.get_mut(&self.id) {
            *n = n.saturating_sub(1);
        }
    }
}
