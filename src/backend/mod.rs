//! The one interface every device implements: run a step over a batch of sequences that read and
//! write a paged KV cache, and move KV blocks in and out (for disaggregation).
//!
//! KV layout (the same on every device, so transfers and TP splits are simple): per layer, a K and
//! a V pool, each `[num_blocks, num_kv_heads, block_size, head_dim]`. A sequence's token at
//! position `p` lives in block `block_table[p / block_size]`, slot `p % block_size`.

pub mod cpu;
pub mod cuda;
pub mod factory;
pub mod sampling;
pub mod steps;

use crate::model::config::LlamaConfig;
use anyhow::{Context, Result};
pub use steps::{PreviousToken, StepQueue};

/// Which device runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// CUDA when a GPU is found, else CPU.
    Auto,
    Cpu,
    Cuda,
}

/// What the KV cache stores (vLLM's `--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvCacheDtype {
    /// The activations' type (BF16 when serving).
    #[default]
    Auto,
    /// e4m3 codes with per-tensor scales (CUDA, BF16 activations): half the bytes per token.
    #[value(alias = "fp8_e4m3")]
    Fp8,
}

/// The slice of one sequence that a step processes.
#[derive(Debug, Clone)]
pub struct SeqChunk {
    /// Tokens to run this step (a prefill chunk, or one token when decoding).
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`; positions `0..start_pos` are already in the KV cache.
    pub start_pos: usize,
    /// KV block ids covering positions `0..start_pos + tokens.len()`.
    pub block_table: Vec<u32>,
    /// What to produce for the last token of this chunk.
    pub emit: Emit,
}

/// What the engine wants back for a sequence of the step.
#[derive(Debug, Clone, PartialEq)]
pub enum Emit {
    /// Nothing: a prefill chunk that is not the last one.
    Nothing,
    /// Full-vocabulary logits of the last token (for penalties, logprobs, min-p...).
    Logits,
    /// Sample on the device (fast path): greedy when `temperature == 0`.
    Sample(DeviceSampling),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSampling {
    pub temperature: f32,
    /// 0 = off
    pub top_k: usize,
    /// 1.0 = off
    pub top_p: f32,
    /// Random number in [0, 1) drawn by the engine from the request's seeded generator.
    pub uniform: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SeqOutput {
    Nothing,
    /// `[vocab]` f32
    Logits(Vec<f32>),
    Token(u32),
}

#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub seqs: Vec<SeqChunk>,
}

impl Batch {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KvDtype {
    F32,
    Bf16,
    F8E4M3,
}

impl KvDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
            KvDtype::F8E4M3 => 1,
        }
    }
}

/// Shape of the paged KV cache; two backends with equal layouts can exchange blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    /// Bytes of one block across all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        2 * self.num_layers
            * self.num_kv_heads
            * self.block_size
            * self.head_dim
            * self.dtype.size_bytes()
    }
}

/// Where a CUDA backend keeps its KV pool, for device-to-device transfers (`kv::transfer::cuda`):
/// one `cuMemAlloc` allocation of `bytes` at `base` on GPU `device`, holding per layer a K pool then
/// a V pool, each `[num_blocks, num_kv_heads, block_size, head_dim]` of `layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaKvPool {
    pub device: usize,
    pub base: u64,
    pub bytes: usize,
    pub num_blocks: usize,
    pub layout: KvLayout,
}

pub trait Backend: Send {
    fn config(&self) -> &LlamaConfig;
    fn kv_layout(&self) -> KvLayout;
    fn num_kv_blocks(&self) -> usize;
    /// Runs one forward pass: writes the KV of every chunk's tokens into its blocks, then returns
    /// one output per sequence, in batch order.
    fn step(&mut self, batch: &Batch) -> Result<Vec<SeqOutput>>;
    /// Queues a step and returns without waiting for it when the device allows (`finish_step`
    /// gives its outputs, steps finish in launch order). The chunks in `previous` start with the
    /// token the previous launched step sampled (`steps`). A step after one that returns logits is
    /// launched only once that one is finished. By default the batch waits in `step_queue`.
    fn launch_step(&mut self, batch: &Batch, previous: &[PreviousToken]) -> Result<()> {
        let queue = self
            .step_queue()
            .context("this backend keeps no step queue")?;
        queue.launch(batch, previous);
        Ok(())
    }
    /// Waits for the oldest launched step and returns its outputs, one per sequence. By default
    /// the oldest batch of `step_queue` runs through `step` now.
    fn finish_step(&mut self) -> Result<Vec<SeqOutput>> {
        let queue = self
            .step_queue()
            .context("this backend keeps no step queue")?;
        let batch = queue.take_next()?;
        let outputs = self.step(&batch)?;
        if let Some(queue) = self.step_queue() {
            queue.done(&outputs);
        }
        Ok(outputs)
    }
    /// Where the default `launch_step` keeps launched batches (backends that compute a step when
    /// it is finished); `None` for one that overrides `launch_step` and `finish_step`.
    fn step_queue(&mut self) -> Option<&mut StepQueue> {
        None
    }
    /// `launch_step` returns before the step is computed (a GPU's stream), so the engine gains by
    /// scheduling the next step meanwhile. Backends that compute in `finish_step` say no: the
    /// engine then finishes each step before it schedules the next.
    fn queues_steps(&self) -> bool {
        false
    }
    /// Copies blocks out to host memory. Wire format: for each block in order, for each layer,
    /// K then V, each `[num_kv_heads, block_size, head_dim]` in `kv_layout().dtype`, little endian.
    fn export_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>>;
    /// Writes blocks in the format of `export_blocks`.
    fn import_blocks(&mut self, blocks: &[u32], data: &[u8]) -> Result<()>;
    /// The device KV pool, when the backend keeps one that peers or other processes can reach.
    fn cuda_kv_pool(&self) -> Option<CudaKvPool> {
        None
    }
    /// The device KV pools of every tensor-parallel rank, rank order (rank `r` holds its share of
    /// the heads); empty when there is none. A single-GPU backend has its one pool.
    fn cuda_kv_pools(&self) -> Vec<CudaKvPool> {
        self.cuda_kv_pool().into_iter().collect()
    }
}
