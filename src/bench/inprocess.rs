//! The in-process load target: requests go straight to workers in this process through
//! `WorkerClient` (no HTTP, no tokenizing on the way back), measured exactly like HTTP targets.
//! Requests go to the worker with the fewest of this target's requests in flight.

use super::prompts::Prompt;
use super::target::{Chunk, ChunkStream, LoadTarget};
use crate::backend::factory::{build_backend, BackendOptions};
use crate::backend::DeviceKind;
use crate::engine::types::{GenerateRequest, SamplingParams};
use crate::engine::{Engine, EngineConfig, EngineHandle};
use crate::model::{LoadFormat, ModelFiles};
use crate::worker::decode::DecodeConfig;
use crate::worker::deployment::{
    start_embedded, EmbeddedDeployment, EmbeddedSpec, EmbeddedTransport,
};
use crate::worker::local::LocalWorker;
use crate::worker::prefill::PrefillConfig;
use crate::worker::WorkerClient;
use anyhow::{anyhow, bail, Result};
use futures::future::BoxFuture;
use futures::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct WorkerTarget {
    workers: Vec<Arc<dyn WorkerClient>>,
    /// Keeps a disaggregated deployment's prefill workers running while the target lives.
    _embedded: Option<EmbeddedDeployment>,
    in_flight: Arc<Vec<AtomicUsize>>,
    next_id: AtomicUsize,
}

impl WorkerTarget {
    pub fn new(workers: Vec<Arc<dyn WorkerClient>>) -> Result<Self> {
        if workers.is_empty() {
            bail!("in-process benchmark needs at least one worker");
        }
        let in_flight = Arc::new(workers.iter().map(|_| AtomicUsize::new(0)).collect());
        Ok(Self {
            workers,
            _embedded: None,
            in_flight,
            next_id: AtomicUsize::new(0),
        })
    }

    /// Drives the request-taking workers of an embedded (e.g. disaggregated) deployment.
    pub fn embedded(deployment: EmbeddedDeployment) -> Result<Self> {
        let mut target = Self::new(deployment.workers.clone())?;
        target._embedded = Some(deployment);
        Ok(target)
    }

    fn pick(&self) -> usize {
        (0..self.workers.len())
            .min_by_key(|&i| self.in_flight[i].load(Ordering::Relaxed))
            .expect("non-empty")
    }
}

/// Counts a request in flight until its stream is dropped.
struct InFlight(Arc<Vec<AtomicUsize>>, usize);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The sampling parameters of the guide's load: exactly `osl` tokens, EOS ignored, greedy.
pub fn forced_length(osl: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: osl,
        min_tokens: osl,
        ignore_eos: true,
        ..Default::default()
    }
}

impl LoadTarget for WorkerTarget {
    fn stream(&self, prompt: &Prompt, osl: usize) -> BoxFuture<'static, Result<ChunkStream>> {
        let i = self.pick();
        self.in_flight[i].fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(self.in_flight.clone(), i);
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let worker = self.workers[i].clone();
        let req = GenerateRequest {
            id: format!("bench-{n}"),
            prompt_tokens: prompt.token_ids.clone(),
            params: forced_length(osl),
        };
        Box::pin(async move {
            if req.prompt_tokens.is_empty() {
                bail!("in-process benchmarking needs prompt token ids: give the model's tokenizer");
            }
            let stream = worker
                .generate(req)
                .await
                .map_err(|e| anyhow!("{}: {e}", worker.id()))?;
            let chunks = stream.map(move |out| {
                let _in_flight = &guard;
                let out = out.map_err(|e| anyhow!("{e}"))?;
                Ok(Chunk {
                    text: out.text,
                    tokens: Some(out.token_ids.len()),
                    completion_tokens: None,
                })
            });
            Ok(chunks.boxed())
        })
    }
}

/// KV blocks per engine on the CPU when not given (as `tandem serve` uses).
const CPU_KV_BLOCKS: usize = 512;

/// An embedded aggregated deployment: `replicas` engines of one model in this process.
#[derive(Debug, Clone)]
pub struct LocalDeployment {
    /// A model directory or preset name (see `ModelFiles::resolve`).
    pub model: String,
    pub load_format: LoadFormat,
    pub device: DeviceKind,
    pub block_size: usize,
    /// Seed of dummy weights.
    pub seed: u64,
    pub engine: EngineConfig,
    /// KV pool per engine; `None`: from `gpu_memory_utilization` on a GPU (shared evenly by
    /// the engines started together), `CPU_KV_BLOCKS` on the CPU.
    pub num_kv_blocks: Option<usize>,
    pub gpu_memory_utilization: f64,
    pub replicas: usize,
}

/// Loads the model once and starts one engine per replica; also returns the model's files
/// (its tokenizer builds the prompts).
pub fn start_aggregated(d: &LocalDeployment) -> Result<(Vec<Arc<dyn WorkerClient>>, ModelFiles)> {
    let (engines, files) = start_engines(d, d.replicas)?;
    let workers = engines
        .into_iter()
        .enumerate()
        .map(|(i, e)| Arc::new(LocalWorker::new(format!("agg-{i}"), e)) as Arc<dyn WorkerClient>)
        .collect();
    Ok((workers, files))
}

/// Loads the model once and starts `n` engines of it.
pub fn start_engines(d: &LocalDeployment, n: usize) -> Result<(Vec<EngineHandle>, ModelFiles)> {
    if n == 0 {
        bail!("an embedded deployment needs at least one worker");
    }
    let files = ModelFiles::resolve(&d.model)?;
    let opts = BackendOptions {
        gpu: 0,
        tensor_parallel_size: 1,
        block_size: d.block_size,
        num_kv_blocks: d.num_kv_blocks,
        gpu_memory_utilization: d.gpu_memory_utilization / n as f64,
        max_num_batched_tokens: d.engine.max_num_batched_tokens,
        max_num_seqs: d.engine.max_num_seqs,
        cpu_default_blocks: CPU_KV_BLOCKS,
        enforce_eager: false,
        kv_cache_dtype: Default::default(),
    };
    let mut engines = Vec::new();
    for _ in 0..n {
        // Dummy weights for a GPU are generated there; host weights are loaded per engine.
        let backend = build_backend(d.device, &files, d.load_format, d.seed, &opts)?;
        engines.push(Engine::start(backend, None, d.engine.clone()));
    }
    Ok((engines, files))
}

/// An embedded disaggregated deployment: `prefill` prefill engines and `decode` decode engines
/// of one model, KV moved in process, every prefill remote (as in the guide).
pub async fn start_disaggregated(
    d: &LocalDeployment,
    prefill: usize,
    decode: usize,
) -> Result<(EmbeddedDeployment, ModelFiles)> {
    if prefill == 0 || decode == 0 {
        bail!("a disaggregated deployment needs at least one prefill and one decode worker");
    }
    let local = d.clone();
    let (mut engines, files) =
        tokio::task::spawn_blocking(move || start_engines(&local, prefill + decode)).await??;
    let decode_engines = engines.split_off(prefill);
    let spec = EmbeddedSpec {
        agg: vec![],
        prefill: engines,
        decode: decode_engines,
        decode_config: DecodeConfig {
            conditional_disagg: false,
            ..Default::default()
        },
        prefill_config: PrefillConfig::default(),
        transport: EmbeddedTransport::InProcess,
    };
    Ok((start_embedded(spec).await?, files))
}
