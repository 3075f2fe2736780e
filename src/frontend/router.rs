//! Picks a worker for each request. It only sees `Arc<dyn WorkerClient>`, so in-process and
//! remote workers are routed the same way.
//!
//! KV-aware mode follows Dynamo's idea: each worker's cost is the prompt blocks it would have to
//! prefill (those not already in its prefix cache, weighted) plus the KV blocks it already holds;
//! the cheapest wins. What a worker caches is estimated from the prompts routed to it.

use super::kv_index::{block_hashes, KvIndex};
use crate::engine::types::{EngineError, EngineMetrics, GenerateRequest};
use crate::worker::{OutputStream, WorkerClient};
use futures::StreamExt;
use parking_lot::Mutex;
use rand::Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    RoundRobin,
    Random,
    LeastLoaded,
    KvAware,
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub mode: RouterMode,
    /// Tokens per KV block (the workers' `--block-size`), for prefix hashing.
    pub block_size: usize,
    /// Weight of a block to prefill against a block already held (Dynamo's default is 1).
    pub overlap_weight: f64,
    /// Most block hashes remembered per worker.
    pub index_capacity: usize,
    /// How long a worker that answered `Unavailable` is skipped.
    pub unavailable_cooldown: Duration,
}

impl RouterConfig {
    pub fn new(mode: RouterMode, block_size: usize) -> Self {
        Self {
            mode,
            block_size: block_size.max(1),
            overlap_weight: 1.0,
            index_capacity: 1 << 20,
            unavailable_cooldown: Duration::from_secs(5),
        }
    }
}

/// What the router tracks per worker besides the client.
struct Slot {
    client: Arc<dyn WorkerClient>,
    in_flight: AtomicUsize,
    /// KV blocks that in-flight requests routed here will hold (prompt + max_tokens).
    in_flight_blocks: AtomicUsize,
    down_until: Mutex<Option<Instant>>,
    index: Mutex<KvIndex>,
}

pub struct Router {
    config: RouterConfig,
    slots: Vec<Arc<Slot>>,
    next: AtomicUsize,
}

/// A worker's load as the router sees it.
#[derive(Debug, Clone)]
pub struct WorkerLoad {
    pub id: String,
    pub in_flight: usize,
    pub available: bool,
    pub metrics: EngineMetrics,
}

impl Router {
    pub fn new(workers: Vec<Arc<dyn WorkerClient>>, config: RouterConfig) -> Self {
        let slots = workers
            .into_iter()
            .map(|client| {
                Arc::new(Slot {
                    client,
                    in_flight: AtomicUsize::new(0),
                    in_flight_blocks: AtomicUsize::new(0),
                    down_until: Mutex::new(None),
                    index: Mutex::new(KvIndex::new(config.index_capacity)),
                })
            })
            .collect();
        Self {
            config,
            slots,
            next: AtomicUsize::new(0),
        }
    }

    pub fn mode(&self) -> RouterMode {
        self.config.mode
    }

    pub fn loads(&self) -> Vec<WorkerLoad> {
        let now = Instant::now();
        self.slots
            .iter()
            .map(|s| WorkerLoad {
                id: s.client.id().to_string(),
                in_flight: s.in_flight.load(Ordering::SeqCst),
                available: s.is_available(now),
                metrics: s.client.metrics(),
            })
            .collect()
    }

    /// Starts `req` on a worker. A worker answering `Unavailable` is marked down and the next
    /// candidate is tried (the request has not started anywhere yet).
    pub async fn generate(&self, req: GenerateRequest) -> Result<OutputStream, EngineError> {
        let hashes = block_hashes(&req.prompt_tokens, self.config.block_size);
        let blocks =
            (req.prompt_tokens.len() + req.params.max_tokens).div_ceil(self.config.block_size);
        let mut tried = vec![false; self.slots.len()];
        loop {
            let Some(i) = self.pick(&hashes, &tried) else {
                return Err(EngineError::Unavailable("no worker is available".into()));
            };
            tried[i] = true;
            let slot = &self.slots[i];
            match slot.client.generate(req.clone()).await {
                Ok(stream) => {
                    slot.index.lock().insert(&hashes);
                    return Ok(self.track(i, blocks, stream));
                }
                Err(EngineError::Unavailable(why)) => {
                    tracing::warn!(worker = slot.client.id(), %why, "worker unavailable; skipping it");
                    slot.mark_down(self.config.unavailable_cooldown);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Counts the request as in flight on worker `i` until its stream ends or is dropped, and
    /// marks the worker down if the stream fails with `Unavailable` (a remote worker died).
    fn track(&self, i: usize, blocks: usize, stream: OutputStream) -> OutputStream {
        let slot = self.slots[i].clone();
        let guard = InFlight::new(slot.clone(), blocks);
        let cooldown = self.config.unavailable_cooldown;
        Box::pin(stream.map(move |item| {
            if let Err(EngineError::Unavailable(_)) = &item {
                guard.slot.mark_down(cooldown);
            }
            item
        }))
    }

    /// The chosen worker's index, among those not yet tried and not marked down.
    pub fn pick(&self, hashes: &[u64], tried: &[bool]) -> Option<usize> {
        let now = Instant::now();
        let candidates: Vec<usize> = (0..self.slots.len())
            .filter(|&i| !tried[i] && self.slots[i].is_available(now))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Rotating the scan order makes ties fall to workers in turn.
        let rotated = (0..candidates.len()).map(|k| candidates[(start + k) % candidates.len()]);
        let best_by = |cost: &dyn Fn(usize) -> f64| {
            rotated.clone().min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
        };
        match self.config.mode {
            RouterMode::RoundRobin => Some(candidates[start % candidates.len()]),
            RouterMode::Random => Some(candidates[rand::rng().random_range(0..candidates.len())]),
            RouterMode::LeastLoaded => best_by(&|i| self.slots[i].load() as f64),
            RouterMode::KvAware => {
                let w = self.config.overlap_weight;
                best_by(&|i| {
                    let slot = &self.slots[i];
                    let overlap = slot.index.lock().prefix_overlap(hashes);
                    let to_prefill = hashes.len().saturating_sub(overlap) as f64;
                    let held = slot.active_blocks() as f64;
                    w * to_prefill + held
                })
            }
        }
    }
}

impl Slot {
    fn is_available(&self, now: Instant) -> bool {
        self.down_until.lock().is_none_or(|t| now >= t)
    }

    fn mark_down(&self, cooldown: Duration) {
        *self.down_until.lock() = Some(Instant::now() + cooldown);
    }

    /// Requests this router has in flight here, or what the worker reports if more (other
    /// frontends may share it).
    fn load(&self) -> usize {
        let m = self.client.metrics();
        self.in_flight
            .load(Ordering::SeqCst)
            .max(m.running + m.waiting)
    }

    fn active_blocks(&self) -> usize {
        self.in_flight_blocks
            .load(Ordering::SeqCst)
            .max(self.client.metrics().kv_blocks_active)
    }
}

/// Decrements the worker's in-flight counters when the stream it rides in is dropped.
struct InFlight {
    slot: Arc<Slot>,
    blocks: usize,
}

impl InFlight {
    fn new(slot: Arc<Slot>, blocks: usize) -> Self {
        slot.in_flight.fetch_add(1, Ordering::SeqCst);
        slot.in_flight_blocks.fetch_add(blocks, Ordering::SeqCst);
        Self { slot, blocks }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.slot
            .in_flight_blocks
            .fetch_sub(self.blocks, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::SamplingParams;
    use crate::frontend::mock::{MockConfig, MockWorker};

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
}
