//! [`CudaBackend`]: the Llama forward pass on one GPU over a paged KV cache.
//!
//! Everything is allocated at construction (weights, KV pool, workspaces for
//! `max_num_batched_tokens` tokens and `max_num_seqs` outputs); a step makes one host-to-device
//! copy (the packed plan), launches its kernels on one stream, and copies back only the sampled
//! tokens (and the logits rows asked for).
//!
//! Precision: BF16 activations and KV (serving), or F32 activations, KV and dense weights (the
//! reference mode, which follows an f32 implementation such as the CPU backend token for token).
//! The residual stream and all accumulation are F32 in both.

use super::device::{DeviceBuffer, Gpu, Profiler};
use super::gemm::Gemm;
use super::kernels::Kernels;
use super::meta::{plan_step, SplitPolicy, StepPlan};
use super::nccl::{TpRank, TpSetup};
use super::ops::{
    combine_fp8_scratch_bytes, flash_supported, kv_tensor_maps, AttentionArgs, Fp8KvScales, Ops,
    Precision, KV_TENSOR_MAPS_BYTES, WGMMA_HEAD_DIM,
};
use super::shard::Shard;
use super::weights::{GpuLinear, GpuWeights};
use crate::backend::{Backend, Batch, KvCacheDtype, KvDtype, KvLayout, PreviousToken, SeqOutput};
use crate::model::config::LlamaConfig;
use crate::model::weights::LlamaWeights;
use anyhow::{bail, ensure, Context, Result};
use graphs::{DecodeGraph, StepGraphs, GRAPH_CAPACITY};
use linear::{Lin, LinOut};

mod combine;
mod graphs;
mod kv_io;
mod linear;
mod pending;

pub use kv_io::LayerKvHook;

#[derive(Debug, Clone)]
pub struct CudaOptions {
    pub device: usize,
    pub block_size: usize,
    /// Fraction of the GPU's memory this process may use (weights, workspaces and KV pool).
    pub gpu_memory_utilization: f64,
    /// Overrides the KV block count computed from `gpu_memory_utilization`.
    pub num_blocks: Option<usize>,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub precision: Precision,
    /// Fewest keys per part when a decode tile's keys are split across blocks (flash-decoding).
    pub split_min_keys: usize,
    /// Tensor parallelism: quantize the inputs of row-parallel FP8 linears (o_proj, down_proj) with
    /// the per-token scale of the whole row (a max all-reduce over ranks), so TP gives TP1's numbers;
    /// off, each rank scales its own slice, as vLLM does (one all-reduce fewer per linear).
    pub tp_whole_row_fp8_scales: bool,
    /// Launches every step's kernels one by one (vLLM's flag); otherwise decode steps replay
    /// CUDA graphs (see `backend/graphs.rs`).
    pub enforce_eager: bool,
    /// FP8 (e4m3) or activation-typed KV pool.
    pub kv_cache_dtype: KvCacheDtype,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            device: 0,
            block_size: 128,
            gpu_memory_utilization: 0.9,
            num_blocks: None,
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            precision: Precision::Bf16,
            split_min_keys: 128,
            tp_whole_row_fp8_scales: false,
            enforce_eager: false,
            kv_cache_dtype: KvCacheDtype::Auto,
        }
    }
}

pub enum WeightSource<'a> {
    Host(&'a LlamaWeights),
    /// Seeded random weights generated on the GPU.
    Dummy {
        seed: u64,
    },
}

/// Step workspaces, sized once for the largest step.
struct Workspace {
    residual: DeviceBuffer,
    xn: DeviceBuffer,
    qkv: DeviceBuffer,
    attn: DeviceBuffer,
    delta: DeviceBuffer,
    gate_up: DeviceBuffer,
    act: DeviceBuffer,
    xq: DeviceBuffer,
    xs: DeviceBuffer,
    last_norm: DeviceBuffer,
    logits: DeviceBuffer,
    tokens_out: DeviceBuffer,
    meta: DeviceBuffer,
    part_ml: DeviceBuffer,
    part_acc: DeviceBuffer,
    /// The fused combine's per-row ticket counters (zeroed here; each launch leaves them zero)
    /// and its blocks' partial maxima (see `backend/combine.rs`).
    combine_counters: DeviceBuffer,
    combine_amax: DeviceBuffer,
}

/// Partial-result slots for split decode attention (flash-decoding).
const MAX_ATTENTION_PARTS: usize = 2048;

impl Workspace {
    fn new(gpu: &Gpu, c: &LlamaConfig, t: usize, s: usize, p: Precision) -> Result<Self> {
        let (h, i, a) = (c.hidden_size, c.intermediate_size, p.bytes());
        let qkv_n = c.q_size() + 2 * c.kv_size();
        Ok(Self {
            residual: gpu.alloc(t * h * 4)?,
            xn: gpu.alloc(t * h * a)?,
            qkv: gpu.alloc(t * qkv_n * a)?,
            attn: gpu.alloc(t * c.q_size() * a)?,
            delta: gpu.alloc(t * h * a)?,
            gate_up: gpu.alloc(t * 2 * i * a)?,
            // act doubles as the fused FP8 silu's scratch (unused on that path).
            act: gpu.alloc((t * i * a).max(Ops::fused_silu_scratch_bytes(t, i)))?,
            xq: gpu.alloc(t * h.max(i).max(c.q_size()))?,
            xs: gpu.alloc(t * 4)?,
            last_norm: gpu.alloc(s * h * a)?,
            logits: gpu.alloc(s * c.vocab_size * 4)?,
            tokens_out: gpu.alloc(s * 4)?,
            meta: gpu.alloc((8 * t + 16 * s) * 4)?,
            part_ml: gpu.alloc(MAX_ATTENTION_PARTS * c.q_size() / c.head_dim * 2 * 4)?,
            part_acc: gpu.alloc(MAX_ATTENTION_PARTS * c.q_size() * 4)?,
            combine_counters: {
                let b = gpu.alloc(t * 4)?;
                gpu.memset(&b, 0)?;
                b
            },
            combine_amax: gpu.alloc(combine_fp8_scratch_bytes(t, c.num_attention_heads))?,
        })
    }
}

pub struct CudaBackend {
    config: LlamaConfig,
    opts: CudaOptions,
    // Field order is drop order: everything on the device goes before the context in `gpu`.
    profiler: Profiler,
    /// Captured decode steps.
    graphs: StepGraphs<DecodeGraph>,
    /// Launched steps not read back yet, and their pinned host buffers.
    pending: pending::PendingSteps,
    ws: Workspace,
    kv: DeviceBuffer,
    /// Each layer's K and V tensor maps for the wgmma prefill attention's TMA loads (BF16 pools
    /// of head_dim 128 with block sizes that are multiples of 64).
    kv_maps: Option<DeviceBuffer>,
    weights: GpuWeights,
    /// Tensor parallelism: this backend is one rank's shard (see `tp.rs`).
    tp: Option<TpRank>,
    gemm: Gemm,
    kernels: Kernels,
    gpu: Gpu,
    num_blocks: usize,
    multiprocessors: usize,
    /// Blocks an attention launch should have to fill the GPU (4 per multiprocessor).
    attention_target_blocks: usize,
    /// Called after each layer's KV is written (see [`CudaBackend::set_layer_kv_hook`]).
    layer_kv_hook: Option<LayerKvHook>,
    /// Merge split decode rows and FP8-quantize them for o_proj in one kernel where it applies
    /// (`TANDEM_COMBINE_FP8=0` keeps the unfused pair, for comparisons).
    fused_combine: bool,
    /// Leave decode's unscaled o_proj / down_proj products for the next norm to scale
    /// (`backend/linear.rs` `LinOut`; `TANDEM_FOLD_EPILOGUE=0` scales them in a kernel of their own).
    fold_epilogues: bool,
}

/// KV blocks that fit in `utilization · total − used` bytes.
pub fn num_blocks_for(utilization: f64, free: usize, total: usize, block_bytes: usize) -> usize {
    let used = total.saturating_sub(free) as f64;
    let budget = utilization * total as f64 - used;
    if budget <= 0.0 {
        0
    } else {
        (budget / block_bytes as f64) as usize
    }
}

impl CudaBackend {
    pub fn new(config: &LlamaConfig, source: WeightSource, opts: CudaOptions) -> Result<Self> {
        Self::new_rank(config, source, opts, None)
    }

    /// One tensor-parallel rank of the model `full` (host weights already cut to the shard), or
    /// the whole model when `tp` is `None`. Joins the NCCL group first, before anything can fail
    /// on one rank only.
    pub fn new_rank(
        full: &LlamaConfig,
        source: WeightSource,
        opts: CudaOptions,
        tp: Option<TpSetup>,
    ) -> Result<Self> {
        let shard = tp.map(|t| t.shard).unwrap_or(Shard::WHOLE);
        let config = &shard.local_config(full)?;
        ensure!(
            opts.block_size > 0 && opts.max_num_batched_tokens > 0 && opts.max_num_seqs > 0,
            "bad CUDA options {opts:?}"
        );
        ensure!(
            opts.gpu_memory_utilization > 0.0 && opts.gpu_memory_utilization <= 1.0,
            "--gpu-memory-utilization must be in (0, 1], got {}",
            opts.gpu_memory_utilization
        );
        if opts.kv_cache_dtype == KvCacheDtype::Fp8 {
            let group = config.num_attention_heads / config.num_key_value_heads.max(1);
            ensure!(
                flash_supported(group, config.head_dim, opts.precision),
                "--kv-cache-dtype fp8 needs BF16 activations and the tensor-core attention \
                 (head_dim 16..=128 in steps of 16, at most 64 query heads per kv head)"
            );
        }
        let gpu = Gpu::new(opts.device)?;
        let tp = match tp {
            Some(setup) => Some(TpRank::new(
                setup,
                &gpu,
                full.vocab_size,
                opts.max_num_seqs,
            )?),
            None => None,
        };
        let kernels = Kernels::load().context("loading the CUDA kernels")?;
        let gemm = Gemm::new()?;
        let p = opts.precision;
        let weights = match source {
            WeightSource::Host(w) => {
                let rows = shard.vocab_per_rank(full.vocab_size);
                ensure!(
                    w.embed_tokens.dims().first() == Some(&rows),
                    "rank {} of {}: host weights are not cut to the shard ({rows} embedding rows expected)",
                    shard.rank,
                    shard.world
                );
                GpuWeights::upload(&gpu, config, w, p)?
            }
            WeightSource::Dummy { seed } => {
                ensure!(
                    p == Precision::Bf16,
                    "dummy weights are generated in BF16 precision only"
                );
                let ops = Ops {
                    k: &kernels,
                    stream: gpu.cu_stream(),
                    act: p,
                };
                GpuWeights::dummy(&gpu, &ops, config, seed)?
            }
        };
        let ws = Workspace::new(
            &gpu,
            config,
            opts.max_num_batched_tokens,
            opts.max_num_seqs,
            p,
        )?;
        let block_bytes = Self::layout_for(config, &opts).block_bytes();
        let num_blocks = match opts.num_blocks {
            Some(n) => n,
            None => {
                let (free, total) = gpu.mem_info()?;
                num_blocks_for(opts.gpu_memory_utilization, free, total, block_bytes)
            }
        };
        if num_blocks == 0 {
            bail!(
                "no room for KV blocks: weights use {:.1} GiB; raise --gpu-memory-utilization (now {})",
                weights.bytes() as f64 / (1u64 << 30) as f64,
                opts.gpu_memory_utilization
            );
        }
        let kv = gpu
            .alloc(num_blocks * block_bytes)
            .context("allocating the KV pool")?;
        gpu.sync()?;
        tracing::info!(
            weights_gib = weights.bytes() as f64 / (1u64 << 30) as f64,
            kv_blocks = num_blocks,
            kv_tokens = num_blocks * opts.block_size,
            "CUDA backend ready"
        );
        let profiler = Profiler::default();
        let sms = gpu.ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        let attention_target_blocks = 4 * sms;
        let mut backend = Self {
            config: config.clone(),
            opts,
            profiler,
            ws,
            kv,
            weights,
            tp,
            gemm,
            kernels,
            gpu,
            num_blocks,
            multiprocessors: sms,
            attention_target_blocks,
            layer_kv_hook: None,
            fused_combine: std::env::var("TANDEM_COMBINE_FP8").map_or(true, |v| v != "0"),
            fold_epilogues: std::env::var("TANDEM_FOLD_EPILOGUE").map_or(true, |v| v != "0"),
            graphs: StepGraphs::new(GRAPH_CAPACITY),
            pending: Default::default(),
            kv_maps: None,
        };
        backend.kv_maps = backend.kv_tensor_maps()?;
        Ok(backend)
    }

    fn layout_for(c: &LlamaConfig, opts: &CudaOptions) -> KvLayout {
        KvLayout {
            num_layers: c.num_hidden_layers,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            block_size: opts.block_size,
            dtype: match (opts.kv_cache_dtype, opts.precision) {
                (KvCacheDtype::Fp8, _) => KvDtype::F8E4M3,
                (KvCacheDtype::Auto, Precision::Bf16) => KvDtype::Bf16,
                (KvCacheDtype::Auto, Precision::F32) => KvDtype::F32,
            },
        }
    }

    /// The scales of an FP8 pool (None: the pool holds activation-typed values). Per-tensor and
    /// 1.0, vLLM's default without calibrated scales: codes then span 2^-9..448 (saturating) with
    /// 3 significant bits. A checkpoint's calibrated KV scales are not read yet.
    fn kv_fp8(&self) -> Option<Fp8KvScales> {
        (self.opts.kv_cache_dtype == KvCacheDtype::Fp8).then_some(Fp8KvScales { k: 1.0, v: 1.0 })
    }

    /// Bytes of one block of one layer's K (or V).
    fn block_part_bytes(&self) -> usize {
        let l = Self::layout_for(&self.config, &self.opts);
        l.num_kv_heads * l.block_size * l.head_dim * l.dtype.size_bytes()
    }

    /// Bytes of one layer's K (or V) pool.
    fn pool_bytes(&self) -> usize {
        self.num_blocks * self.block_part_bytes()
    }

    /// The pools' tensor maps, where the wgmma kernel can load whole tiles by TMA; the pool is
    /// zeroed then (a tile's keys past the sequence are loaded too, and must be finite).
    fn kv_tensor_maps(&self) -> Result<Option<DeviceBuffer>> {
        let l = Self::layout_for(&self.config, &self.opts);
        let fp8 = match l.dtype {
            KvDtype::Bf16 => false,
            KvDtype::F8E4M3 => true,
            _ => return Ok(None),
        };
        if l.head_dim != WGMMA_HEAD_DIM || !l.block_size.is_multiple_of(64) {
            return Ok(None);
        }
        let rows = self.num_blocks * l.num_kv_heads * l.block_size;
        if rows > i32::MAX as usize {
            return Ok(None); // TMA coordinates are 32-bit: cp.async loads instead
        }
        self.gpu.memset(&self.kv, 0)?;
        let mut maps = Vec::with_capacity(l.num_layers * KV_TENSOR_MAPS_BYTES);
        for layer in 0..l.num_layers {
            maps.extend(kv_tensor_maps(
                self.k_cache(layer),
                self.v_cache(layer),
                rows,
                fp8,
            )?);
        }
        Ok(Some(self.gpu.upload(&maps)?))
    }

    fn k_cache(&self, layer: usize) -> u64 {
        self.kv.at(2 * layer * self.pool_bytes())
    }

    fn v_cache(&self, layer: usize) -> u64 {
        self.kv.at((2 * layer + 1) * self.pool_bytes())
    }

    pub fn options(&self) -> &CudaOptions {
        &self.opts
    }

    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    fn ops(&self) -> Ops<'_> {
        Ops {
            k: &self.kernels,
            stream: self.gpu.cu_stream(),
            act: self.opts.precision,
        }
    }

    /// Fills the whole KV pool with random values (benchmarks that skip the prefill).
    pub fn fill_kv_random(&mut self, seed: u64) -> Result<()> {
        self.gpu.bind()?;
        match self.kv_layout().dtype {
            KvDtype::Bf16 => {
                self.ops()
                    .fill_bf16(self.kv.ptr, self.kv.bytes / 2, seed, -1.0, 1.0)?
            }
            KvDtype::F8E4M3 => self
                .ops()
                .fill_fp8(self.kv.ptr, self.kv.bytes, seed, -1.0, 1.0)?,
            KvDtype::F32 => bail!("random KV fill is for BF16 and FP8 pools"),
        }
        self.gpu.sync()
    }

    /// Changes the fewest keys per split-decode part (benchmarks compare settings).
    pub fn set_split_min_keys(&mut self, keys: usize) {
        self.opts.split_min_keys = keys.max(32);
        self.graphs.clear();
    }

    /// Changes how many attention blocks per multiprocessor split decode aims for.
    pub fn set_attention_blocks_per_sm(&mut self, blocks: usize) {
        self.attention_target_blocks = blocks.max(1) * self.multiprocessors;
        self.graphs.clear();
    }

    /// Fused (combine + FP8 quantize) or unfused merging of split decode rows (benchmarks
    /// compare them).
    pub fn set_fused_combine(&mut self, on: bool) {
        self.fused_combine = on;
        self.graphs.clear();
    }

    /// Eager launches (`true`) or decode-step CUDA graphs (benchmarks compare them).
    pub fn set_enforce_eager(&mut self, on: bool) {
        self.opts.enforce_eager = on;
        self.graphs.clear();
    }

    /// Times every kernel of later steps with CUDA events (see [`Self::take_profile`]).
    pub fn set_profiling(&mut self, on: bool) {
        self.profiler.enabled = on;
    }

    /// (kernel, total ms, launches) since the last call, largest first.
    pub fn take_profile(&mut self) -> Vec<(&'static str, f64, usize)> {
        self.profiler.take()
    }

    fn mark(&mut self, label: &'static str) -> Result<()> {
        self.profiler.mark(label, self.gpu.cu_stream())
    }

    /// The token ids this backend's embedding table holds (a rank's slice under TP).
    fn vocab_slice(&self) -> std::ops::Range<usize> {
        match &self.tp {
            Some(tp) => tp.shard.vocab_range(tp.vocab),
            None => 0..self.config.vocab_size,
        }
    }

    /// Tensor parallelism: sums a row-parallel output (or the vocab-parallel embedding) over the
    /// ranks, in place. Nothing on one GPU.
    fn tp_all_reduce(&mut self, ptr: u64, count: usize, p: Precision) -> Result<()> {
        if let Some(tp) = &self.tp {
            tp.all_reduce(&self.kernels, ptr, count, p, self.gpu.cu_stream())?;
            self.mark("all_reduce")?;
        }
        Ok(())
    }

    /// Under tensor parallelism a row-parallel linear's output is this rank's part, which the next
    /// norm sums over the ranks (`LinOut::RankPartial`); on one GPU it is the output.
    fn rank_partial(&self, out: LinOut) -> Result<LinOut> {
        Ok(match (&self.tp, out) {
            (None, out) => out,
            (Some(_), LinOut::Scaled(p)) => LinOut::RankPartial(p),
            (Some(_), _) => bail!("a row-parallel output to sum over the ranks must be scaled"),
        })
    }

    /// Queues the whole step, layers and head, with no host synchronization (graphs capture it).
    fn queue_step(&mut self, plan: &StepPlan) -> Result<()> {
        self.launch_layers(plan)?;
        self.launch_head(plan)
    }

    /// Queues the embedding and every layer; the plan is in `ws.meta`.
    fn launch_layers(&mut self, plan: &StepPlan) -> Result<()> {
        let c = self.config.clone();
        let n = plan.num_tokens;
        let meta = self.ws.meta.ptr;
        let m = |off: usize| meta + 4 * off as u64;
        let at = &plan.at;
        let h = c.hidden_size;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let qkv_n = c.q_size() + 2 * c.kv_size();
        let ws = &self.ws;
        let (residual, qkv, attn, delta, gate_up) = (
            ws.residual.ptr,
            ws.qkv.ptr,
            ws.attn.ptr,
            ws.delta.ptr,
            ws.gate_up.ptr,
        );
        let q_per_tile = Ops::attention_tokens_per_tile(nh / nkv, hd, self.opts.precision);
        self.ops().embed(
            residual,
            self.weights.embed.ptr,
            m(at.tokens),
            n,
            h,
            self.vocab_slice(),
        )?;
        self.mark("embed")?;
        self.tp_all_reduce(residual, n * h, Precision::F32)?;
        // The previous layer's residual delta (none before the first).
        let mut prev = LinOut::Scaled(0);
        for i in 0..c.num_hidden_layers {
            let norm_w = self.weights.layers[i].input_norm.ptr;
            let fold = self.folds_into_rope();
            let qkv_out = self.norm_linear(Lin::Qkv(i), prev, norm_w, n, qkv, fold)?;
            let unscaled = match qkv_out {
                LinOut::Scaled(_) => None,
                LinOut::RankPartial(_) => bail!("qkv is column-parallel"),
                LinOut::Unscaled { acc, w_scale } => Some([acc, self.ws.xs.ptr, w_scale]),
            };
            let (kc, vc) = (self.k_cache(i), self.v_cache(i));
            self.ops().rope_kv_write(
                qkv,
                unscaled,
                kc,
                vc,
                m(at.positions),
                self.weights.inv_freq.ptr,
                m(at.slots),
                n,
                nh,
                nkv,
                hd,
                self.opts.block_size,
                self.kv_fp8(),
            )?;
            self.mark("rope+kv_write")?;
            if let Some(hook) = self.layer_kv_hook.as_mut() {
                hook(i, self.gpu.stream.cu_stream())?;
            }
            self.ops().paged_attention(&AttentionArgs {
                out: attn,
                qkv,
                k_cache: kc,
                v_cache: vc,
                positions: m(at.positions),
                tile_seq: m(at.tile_seq),
                tile_q_start: m(at.tile_q_start),
                tile_q_len: m(at.tile_q_len),
                block_tables: m(at.block_tables),
                block_table_start: m(at.block_table_start),
                tile_kbeg: m(at.tile_kbeg),
                tile_kend: m(at.tile_kend),
                tile_part: m(at.tile_part),
                part_ml: self.ws.part_ml.ptr,
                part_acc: self.ws.part_acc.ptr,
                num_tiles: plan.num_tiles,
                row_stride: qkv_n,
                q_heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                block_size: self.opts.block_size,
                scale: 1.0 / (hd as f32).sqrt(),
                q_per_tile,
                decode_only: plan.all_decode,
                single_query_items: plan.single_query_items,
                kv_fp8: self.kv_fp8(),
                tensor_maps: self
                    .kv_maps
                    .as_ref()
                    .map_or(0, |m| m.ptr + (i * KV_TENSOR_MAPS_BYTES) as u64),
            })?;
            self.mark("attention")?;
            let groups = [m(at.group_part0), m(at.group_nparts), m(at.group_q0)];
            let fold = self.folds_epilogue(Lin::GateUp(i), n);
            let o = self.combine_o_proj(i, groups, plan.num_groups, n, delta, fold)?;
            let o = self.rank_partial(o)?;
            let norm_w = self.weights.layers[i].post_norm.ptr;
            let fold = self.folds_epilogue(Lin::Down(i), n);
            let gu = self.norm_linear(Lin::GateUp(i), o, norm_w, n, gate_up, fold)?;
            // The last layer's delta goes to the final norm, which reads it scaled.
            let last = i + 1 == c.num_hidden_layers;
            let fold = !last && self.folds_epilogue(Lin::Qkv(i + 1), n);
            prev = self.silu_linear(Lin::Down(i), gu, n, delta, fold)?;
            if last {
                self.tp_all_reduce(delta, n * h, self.opts.precision)?;
            } else {
                prev = self.rank_partial(prev)?;
            }
        }
        if let Some(tp) = &self.tp {
            tp.end_step(&self.kernels, self.gpu.cu_stream())?;
        }
        Ok(())
    }

    /// Queues the final norm, lm_head and sampling of the emitting rows into `ws.tokens_out`.
    fn launch_head(&mut self, plan: &StepPlan) -> Result<()> {
        let c = &self.config;
        let (h, eps, full_vocab) = (c.hidden_size, c.rms_norm_eps as f32, c.vocab_size);
        let ne = plan.emit_seqs.len();
        let meta = self.ws.meta.ptr;
        let m = |off: usize| meta + 4 * off as u64;
        let at = &plan.at;
        let (residual, delta) = (self.ws.residual.ptr, self.ws.delta.ptr);
        let (last_norm, logits, tokens_out) = (
            self.ws.last_norm.ptr,
            self.ws.logits.ptr,
            self.ws.tokens_out.ptr,
        );
        self.ops().final_norm_rows(
            last_norm,
            residual,
            delta,
            m(at.emit_rows),
            self.weights.norm.ptr,
            ne,
            h,
            eps,
        )?;
        self.mark("final_norm")?;
        let stream = self.gpu.cu_stream();
        match &self.weights.lm_head {
            GpuLinear::Bf16 { w, n: v, k } => self
                .gemm
                .bf16(ne, *v, *k, last_norm, w.ptr, logits, true, stream)?,
            GpuLinear::F32 { w, n: v, k, .. } => self
                .gemm
                .f32(ne, *v, *k, last_norm, w.ptr, logits, stream)?,
            GpuLinear::Fp8 { .. } => bail!("lm_head is dequantized at upload"),
        }
        self.mark("lm_head")?;
        let (logits, vocab) = match &self.tp {
            Some(tp) => (tp.gather_logits(logits, ne, &self.gpu)?.ptr, tp.vocab),
            None => (logits, full_vocab),
        };
        if self.tp.is_some() {
            self.mark("gather logits")?;
        }
        self.ops()
            .sample_tokens(tokens_out, logits, m(at.sample_params), ne, vocab)?;
        self.mark("sample")?;
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        Self::layout_for(&self.config, &self.opts)
    }

    fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }

    fn step(&mut self, batch: &Batch) -> Result<Vec<SeqOutput>> {
        if batch.seqs.is_empty() {
            return Ok(vec![]);
        }
        ensure!(
            self.pending.is_empty(),
            "step() while launched steps are pending"
        );
        self.launch_step(batch, &[])?;
        self.finish_step()
    }

    fn launch_step(&mut self, batch: &Batch, previous: &[PreviousToken]) -> Result<()> {
        self.gpu.bind()?;
        let group = self.config.num_attention_heads / self.config.num_key_value_heads;
        let vocab = self.tp.as_ref().map_or(self.config.vocab_size, |t| t.vocab);
        let plan = plan_step(
            batch,
            self.opts.block_size,
            self.num_blocks,
            vocab,
            Ops::attention_tokens_per_tile(group, self.config.head_dim, self.opts.precision),
            Some(SplitPolicy {
                target_blocks: self.attention_target_blocks,
                kv_heads: self.config.num_key_value_heads,
                max_parts: MAX_ATTENTION_PARTS,
                min_keys: self.opts.split_min_keys,
            }),
        )?;
        let chunk_starts: Vec<usize> = batch
            .seqs
            .iter()
            .scan(0, |at, c| {
                let start = *at;
                *at += c.tokens.len();
                Some(start)
            })
            .collect();
        self.launch_plan(&plan, previous, &chunk_starts)
    }

    fn finish_step(&mut self) -> Result<Vec<SeqOutput>> {
        self.finish_pending()
    }

    fn queues_steps(&self) -> bool {
        true
    }

    fn cuda_kv_pool(&self) -> Option<crate::backend::CudaKvPool> {
        Some(self.kv_pool())
    }

    fn export_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>> {
        self.export_to_host(blocks)
    }

    fn import_blocks(&mut self, blocks: &[u32], data: &[u8]) -> Result<()> {
        self.import_from_host(blocks, data)
    }
}
