//! The decode role: receives requests, decides per request whether its prompt is prefilled here or
//! by a prefill worker (conditional disaggregation, as in Dynamo), receives the KV, and decodes.

use super::protocol::{kv_ready_subject, KvReady, RemotePrefillRequest, PREFILL_QUEUE};
use super::{OutputStream, WorkerClient};
use crate::backend::KvLayout;
use crate::engine::types::{EngineError, EngineMetrics, GenerateRequest};
use crate::engine::EngineHandle;
use crate::kv::transfer::{
    reshard, BlockWrite, DeviceWrite, KvDestination, KvEndpoint, KvShards, KvSink,
};
use crate::runtime::Runtime;
use anyhow::{anyhow, Result};
use futures::future::BoxFuture;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeConfig {
    /// Prompts with at most this many tokens left to compute (after prefix-cache hits) are
    /// prefilled here.
    pub max_local_prefill_length: usize,
    /// With this many prompts or more in the prefill queue, prefill here instead.
    pub max_prefill_queue_size: usize,
    /// `false`: every prompt goes to a prefill worker (`--no-conditional-disagg`).
    pub conditional_disagg: bool,
    /// Receive KV cut into this many head shards, as a decode worker with this tensor-parallel
    /// size does (the shards are merged before the import when the engine itself is TP1).
    pub kv_ranks: usize,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            max_local_prefill_length: 512,
            max_prefill_queue_size: 16,
            conditional_disagg: true,
            kv_ranks: 1,
        }
    }
}

pub struct DecodeWorker {
    id: String,
    engine: EngineHandle,
    runtime: Arc<dyn Runtime>,
    config: DecodeConfig,
    destination: KvDestination,
    /// The prefill queue's length and when it was read (read at most every 100 ms).
    queue_len: Mutex<(usize, Option<Instant>)>,
    listener: tokio::task::JoinHandle<()>,
}

impl DecodeWorker {
    /// `endpoints`: where this worker's [`EngineSink`] can be reached, best first.
    pub async fn start(
        id: &str,
        engine: EngineHandle,
        runtime: Arc<dyn Runtime>,
        config: DecodeConfig,
        rank_layout: KvLayout,
        endpoints: Vec<KvEndpoint>,
    ) -> Result<Arc<Self>> {
        let mut notes = runtime.subscribe(&kv_ready_subject(id)).await?;
        let listener_engine = engine.clone();
        let listener = tokio::spawn(async move {
            while let Some(bytes) = notes.next().await {
                let Ok(note) = serde_json::from_slice::<KvReady>(&bytes) else {
                    tracing::warn!("malformed KV-ready notification");
                    continue;
                };
                let engine = listener_engine.clone();
                tokio::spawn(async move { finish_remote_prefill(&engine, note).await });
            }
        });
        let destination = KvDestination {
            endpoints,
            rank_layout,
            tp: config.kv_ranks,
        };
        Ok(Arc::new(Self {
            id: id.to_string(),
            engine,
            runtime,
            config,
            destination,
            queue_len: Mutex::new((0, None)),
            listener,
        }))
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    async fn prefill_queue_len(&self) -> usize {
        let (len, at) = *self.queue_len.lock();
        if at.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            return len;
        }
        let len = match self.runtime.queue_len(PREFILL_QUEUE).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("reading the prefill queue length: {e:#}");
                usize::MAX // unknown: prefill here
            }
        };
        *self.queue_len.lock() = (len, Some(Instant::now()));
        len
    }

    async fn start_request(
        self: Arc<Self>,
        req: GenerateRequest,
    ) -> Result<OutputStream, EngineError> {
        let c = &self.config;
        // The remote prefill sends back the first token but not its logprobs.
        if req.params.logprobs.is_some()
            || (c.conditional_disagg
                && (req.prompt_tokens.len() <= c.max_local_prefill_length
                    || self.prefill_queue_len().await >= c.max_prefill_queue_size))
        {
            return self.engine.generate(req);
        }
        let (ticket, stream) = match self.engine.generate_remote_prefill(req.clone()).await {
            Ok(parked) => parked,
            // No free blocks to park it in: it waits in the local queue instead.
            Err(EngineError::Unavailable(_)) => return self.engine.generate(req),
            Err(e) => return Err(e),
        };
        let uncached = req
            .prompt_tokens
            .len()
            .saturating_sub(ticket.num_cached_blocks * ticket.layout.block_size);
        if c.conditional_disagg && uncached <= c.max_local_prefill_length {
            self.engine.fail_remote_prefill(&req.id).await?; // prefills it here
            return Ok(stream);
        }
        let job = RemotePrefillRequest {
            request: req.clone(),
            decode_worker_id: self.id.clone(),
            ticket,
            destination: self.destination.clone(),
        };
        let payload = serde_json::to_vec(&job).map_err(|e| EngineError::Internal(e.to_string()))?;
        if let Err(e) = self.runtime.queue_push(PREFILL_QUEUE, payload).await {
            tracing::warn!(
                request = req.id,
                "enqueueing a remote prefill failed, prefilling here: {e:#}"
            );
            self.engine.fail_remote_prefill(&req.id).await?;
        }
        Ok(stream)
    }
}

impl Drop for DecodeWorker {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Starts decoding after a prefill worker's notification, or falls back to a local prefill.
async fn finish_remote_prefill(engine: &EngineHandle, note: KvReady) {
    let result = match note.result {
        Ok(first_token) => {
            engine
                .complete_remote_prefill(&note.request_id, first_token)
                .await
        }
        Err(why) => {
            tracing::warn!(
                request = note.request_id,
                "remote prefill failed ({why}); prefilling here"
            );
            engine.fail_remote_prefill(&note.request_id).await
        }
    };
    // A request that finished, was cancelled or timed out meanwhile is no longer parked.
    if let Err(e) = result {
        tracing::debug!(
            request = note.request_id,
            "remote prefill notification ignored: {e}"
        );
    }
}

impl WorkerClient for Arc<DecodeWorker> {
    fn id(&self) -> &str {
        &self.id
    }

    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<OutputStream, EngineError>> {
        Box::pin(self.clone().start_request(req))
    }

    fn metrics(&self) -> EngineMetrics {
        self.engine.metrics()
    }
}

/// Where transferred KV lands in a decode worker: the engine's `import_kv`, which writes only into
/// blocks of a request still parked for them. With several ranks, the shards of one write are
/// gathered and merged first.
/// The shards of one write: its request and destination blocks.
type ShardKey = (String, Vec<u32>);
/// When its first shard came, and the shards so far (one slot per rank).
type PartialWrite = (Instant, Vec<Option<Vec<u8>>>);

pub struct EngineSink {
    engine: EngineHandle,
    layout: KvLayout,
    ranks: usize,
    partial: Mutex<HashMap<ShardKey, PartialWrite>>,
}

impl EngineSink {
    /// `layout` is the engine's; `ranks` must divide its KV heads.
    pub fn new(engine: EngineHandle, layout: KvLayout, ranks: usize) -> Result<Arc<Self>> {
        let ranks = ranks.max(1);
        if !layout.num_kv_heads.is_multiple_of(ranks) {
            anyhow::bail!(
                "cannot receive {} KV heads in {ranks} shards",
                layout.num_kv_heads
            );
        }
        Ok(Arc::new(Self {
            engine,
            layout,
            ranks,
            partial: Mutex::new(HashMap::new()),
        }))
    }

    /// Adds one rank's shard; returns the merged data once every rank's shard is in.
    fn gather(&self, write: &BlockWrite) -> Result<Option<Vec<u8>>> {
        let mut partial = self.partial.lock();
        // Shards of a transfer whose sender died never complete: forget them after a while.
        partial.retain(|_, (t, _)| t.elapsed() < Duration::from_secs(120));
        let key = (write.request_id.clone(), write.block_ids.clone());
        let entry = partial
            .entry(key.clone())
            .or_insert_with(|| (Instant::now(), vec![None; self.ranks]));
        entry.1[write.rank] = Some(write.data.to_vec());
        if entry.1.iter().any(Option::is_none) {
            return Ok(None);
        }
        let (_, shards) = partial.remove(&key).expect("present");
        let shards = KvShards {
            rank_layout: self.rank_layout(),
            shards: shards.into_iter().flatten().collect(),
        };
        Ok(Some(reshard(&shards, 1)?.shards.remove(0)))
    }
}

impl KvSink for EngineSink {
    fn rank_layout(&self) -> KvLayout {
        KvLayout {
            num_kv_heads: self.layout.num_kv_heads / self.ranks,
            ..self.layout
        }
    }

    fn tp(&self) -> usize {
        self.ranks
    }

    fn accepts_device(&self) -> bool {
        self.engine.has_device_kv()
    }

    /// Device KV from a prefill engine of this process: copied GPU to GPU by the engine (whole,
    /// whatever `ranks` is: the engine routes heads to its own ranks' pools).
    fn write_device(&self, write: DeviceWrite) -> Option<BoxFuture<'static, Result<()>>> {
        if !self.engine.has_device_kv() {
            return None;
        }
        let engine = self.engine.clone();
        Some(Box::pin(async move {
            engine
                .import_kv_device(&write.request_id, write.block_ids, write.kv, write.from)
                .await
                .map_err(|e| anyhow!("{e}"))
        }))
    }

    fn write_blocks(&self, write: BlockWrite) -> BoxFuture<'static, Result<()>> {
        let engine = self.engine.clone();
        let merged = if self.ranks == 1 {
            None
        } else {
            Some(self.gather(&write))
        };
        Box::pin(async move {
            let data = match merged {
                None => Arc::try_unwrap(write.data).unwrap_or_else(|shared| (*shared).clone()),
                Some(Ok(Some(all))) => all,
                Some(Ok(None)) => return Ok(()), // the other ranks' shards are still on their way
                Some(Err(e)) => return Err(e),
            };
            engine
                .import_kv(&write.request_id, write.block_ids, data)
                .await
                .map_err(|e| anyhow!("{e}"))
        })
    }
}
