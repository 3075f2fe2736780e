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
use parking_lot::{Mutex, RwLock};
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
    /// Workers can come and go (remote ones are discovered at run time).
    slots: RwLock<Vec<Arc<Slot>>>,
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
        let router = Self {
            config,
            slots: RwLock::new(vec![]),
            next: AtomicUsize::new(0),
        };
        for w in workers {
            router.add_worker(w);
        }
        router
    }

    pub fn mode(&self) -> RouterMode {
        self.config.mode
    }

    /// Adds a worker, or replaces the one with the same id (a restarted remote worker).
    pub fn add_worker(&self, client: Arc<dyn WorkerClient>) {
        let slot = Arc::new(Slot {
            client,
            in_flight: AtomicUsize::new(0),
            in_flight_blocks: AtomicUsize::new(0),
            down_until: Mutex::new(None),
            index: Mutex::new(KvIndex::new(self.config.index_capacity)),
        });
        let mut slots = self.slots.write();
        slots.retain(|s| s.client.id() != slot.client.id());
        slots.push(slot);
    }

    /// Stops routing to a worker; its requests in flight go on.
    pub fn remove_worker(&self, id: &str) -> bool {
        let mut slots = self.slots.write();
        let before = slots.len();
        slots.retain(|s| s.client.id() != id);
        slots.len() < before
    }

    pub fn loads(&self) -> Vec<WorkerLoad> {
        let now = Instant::now();
        self.slots
            .read()
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
        let slots = self.slots.read().clone();
        let mut tried = vec![false; slots.len()];
        loop {
            let Some(i) = self.pick(&slots, &hashes, &tried) else {
                return Err(EngineError::Unavailable("no worker is available".into()));
            };
            tried[i] = true;
            let slot = &slots[i];
            match slot.client.generate(req.clone()).await {
                Ok(stream) => {
                    slot.index.lock().insert(&hashes);
                    return Ok(self.track(slot.clone(), blocks, stream));
                }
                Err(EngineError::Unavailable(why)) => {
                    tracing::warn!(worker = slot.client.id(), %why, "worker unavailable; skipping it");
                    slot.mark_down(self.config.unavailable_cooldown);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Counts the request as in flight on `slot` until its stream ends or is dropped, and marks
    /// the worker down if the stream fails with `Unavailable` (a remote worker died).
    fn track(&self, slot: Arc<Slot>, blocks: usize, stream: OutputStream) -> OutputStream {
        let guard = InFlight::new(slot, blocks);
        let cooldown = self.config.unavailable_cooldown;
        Box::pin(stream.map(move |item| {
            if let Err(EngineError::Unavailable(_)) = &item {
                guard.slot.mark_down(cooldown);
            }
            item
        }))
    }

    /// Index into `slots` of the chosen worker, among those not yet tried and not marked down.
    fn pick(&self, slots: &[Arc<Slot>], hashes: &[u64], tried: &[bool]) -> Option<usize> {
        let now = Instant::now();
        let candidates: Vec<usize> = (0..slots.len())
            .filter(|&i| !tried[i] && slots[i].is_available(now))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Rotating the scan order makes ties fall to workers in turn.
        let rotated = (0..candidates.len()).map(|k| candidates[(start + k) % candidates.len()]);
        let best_by = |cost: &dyn Fn(&Slot) -> f64| {
            rotated
                .clone()
                .min_by(|&a, &b| cost(&slots[a]).total_cmp(&cost(&slots[b])))
        };
        match self.config.mode {
            RouterMode::RoundRobin => Some(candidates[start % candidates.len()]),
            RouterMode::Random => Some(candidates[rand::rng().random_range(0..candidates.len())]),
            RouterMode::LeastLoaded => best_by(&|slot| slot.load() as f64),
            RouterMode::KvAware => {
                let w = self.config.overlap_weight;
                best_by(&|slot| {
                    let overlap = slot.index.lock().prefix_overlap(hashes);
                    let to_prefill = hashes.len().saturating_sub(overlap) as f64;
                    w * to_prefill + slot.active_blocks() as f64
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
