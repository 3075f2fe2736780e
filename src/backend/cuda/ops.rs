//! Typed launches of the kernels in `kernels/*.cu`. Pointers are raw device addresses (`u64`);
//! shapes are checked by the callers that own the buffers. Every launch's status is checked.

use super::kernels::{launch, Arg, Kernels};
use anyhow::{ensure, Result};
use cudarc::driver::sys::CUstream;

mod attention;
mod fused;
pub use attention::{
    combine_fp8_heads_per_block, combine_fp8_scratch_bytes, flash_decode_supported,
    flash_prefill_p, flash_prefill_wgmma_supported, flash_prefill_ws, flash_supported,
    kv_tensor_maps, AttentionArgs, PrefillP, PrefillWs, ATTENTION_ROWS, FLASH_DECODE_GROUP,
    FLASH_ROWS, KV_TENSOR_MAPS_BYTES, MAX_HEAD_DIM, WGMMA_HEAD_DIM,
};
pub use fused::{FUSED_NORM_MAX_COLS, FUSED_SILU_MAX_COLS, SILU_SPLIT_BELOW_ROWS};

/// Threads per block for the per-row kernels (one block per row: a decode row of 8192-28672
/// values needs many threads in flight).
const ROW_THREADS: u32 = 1024;
/// Blocks per row of sample_tokens (kernels/sampling.cu's SAMPLE_CLUSTER).
const SAMPLE_CLUSTER: usize = 8;
const ROPE_THREADS: u32 = 256;
/// Widest rows of add_rmsnorm (chunk sums in shared memory: MAX_NORM_CHUNKS in elementwise.cu).
const NORM_MAX_COLS: usize = 512 * NORM_CHUNK_COLS;
/// Columns per warp chunk of the norm's fixed summation order (CHUNK_COLS in elementwise.cu).
const NORM_CHUNK_COLS: usize = 128;
/// Storage type of activations (and of the KV cache): BF16 for serving, F32 for the
/// reference-precision mode that matches an f32 implementation token for token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Bf16,
    F32,
}

impl Precision {
    pub fn bytes(self) -> usize {
        match self {
            Precision::Bf16 => 2,
            Precision::F32 => 4,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        }
    }
}

/// The per-tensor scales of an FP8 (e4m3) KV pool: a value is its code times the scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fp8KvScales {
    pub k: f32,
    pub v: f32,
}

pub struct Ops<'a> {
    pub k: &'a Kernels,
    pub stream: CUstream,
    /// Which instantiation of the typed kernels to launch.
    pub act: Precision,
}

fn rows(n: usize) -> (u32, u32, u32) {
    (n as u32, 1, 1)
}

impl Ops<'_> {
    fn typed(&self, base: &str) -> String {
        format!("{base}_{}", self.act.suffix())
    }

    fn go(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        launch(
            self.k.get(name)?,
            grid,
            (block, 1, 1),
            shared,
            self.stream,
            args,
        )
    }

    /// `residual[t] = table[tokens[t] - vocab.start]` (F32 residual, BF16 table) for tokens in `vocab` (the rows `table`
    /// holds), zero for the others.
    pub fn embed(
        &self,
        residual: u64,
        table: u64,
        tokens: u64,
        n: usize,
        hidden: usize,
        vocab: std::ops::Range<usize>,
    ) -> Result<()> {
        self.go(
            "embed",
            rows(n),
            ROW_THREADS,
            0,
            &[
                Arg::Ptr(residual),
                Arg::Ptr(table),
                Arg::Ptr(tokens),
                Arg::I32(hidden as i32),
                Arg::I32(vocab.start as i32),
                Arg::I32(vocab.len() as i32),
            ],
        )
    }

    /// `residual += delta` (if `delta != 0`), `out = rmsnorm(residual) * weight`. The sum of
    /// squares has the fixed order of the fused [`Self::add_rmsnorm_fp8`] (same bits).
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm(
        &self,
        residual: u64,
        delta: u64,
        weight: u64,
        out: u64,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        ensure!(
            hidden <= NORM_MAX_COLS,
            "norm of {hidden} columns (at most {NORM_MAX_COLS})"
        );
        self.go(
            &self.typed("add_rmsnorm"),
            rows(n),
            ROW_THREADS,
            0,
            &[
                Arg::Ptr(residual),
                Arg::Ptr(delta),
                Arg::Ptr(weight),
                Arg::Ptr(out),
                Arg::I32(hidden as i32),
                Arg::F32(eps),
            ],
        )
    }

    /// `out[s] = rmsnorm(residual[rows[s]] + delta[rows[s]]) * weight` for `n` selected rows.
    #[allow(clippy::too_many_arguments)]
    pub fn final_norm_rows(
        &self,
        out: u64,
        residual: u64,
        delta: u64,
        rows_idx: u64,
        weight: u64,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        self.go(
            &self.typed("final_norm_rows"),
            rows(n),
            ROW_THREADS,
            0,
            &[
                Arg::Ptr(out),
                Arg::Ptr(residual),
                Arg::Ptr(delta),
                Arg::Ptr(rows_idx),
                Arg::Ptr(weight),
                Arg::I32(hidden as i32),
                Arg::F32(eps),
            ],
        )
    }

    /// Rotary embedding in place on the q and k heads of fused qkv rows.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        qkv: u64,
        positions: u64,
        inv_freq: u64,
        n: usize,
        row_stride: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        // A pair per thread, so a decode row spreads over many blocks.
        let pairs = (q_heads + kv_heads) * (head_dim / 2);
        self.go(
            &self.typed("rope"),
            (n as u32, (pairs as u32).div_ceil(ROPE_THREADS).max(1), 1),
            ROPE_THREADS,
            0,
            &[
                Arg::Ptr(qkv),
                Arg::Ptr(positions),
                Arg::Ptr(inv_freq),
                Arg::I32(row_stride as i32),
                Arg::I32(q_heads as i32),
                Arg::I32(kv_heads as i32),
                Arg::I32(head_dim as i32),
            ],
        )
    }

    /// `out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]`.
    pub fn silu_mul(&self, out: u64, gate_up: u64, n: usize, inter: usize) -> Result<()> {
        self.go(
            &self.typed("silu_mul"),
            // Enough blocks to fill the GPU at batch 1: 8 columns per thread.
            (n as u32, (inter as u32).div_ceil(256 * 8), 1),
            256,
            0,
            &[Arg::Ptr(out), Arg::Ptr(gate_up), Arg::I32(inter as i32)],
        )
    }

    /// Per-row dynamic e4m3 quantization: `scales[t] = max|x[t]| / 448`. Rows of at most
    /// [`FUSED_SILU_MAX_COLS`] are held in registers (one read of the input).
    pub fn quantize_fp8(
        &self,
        out: u64,
        scales: u64,
        input: u64,
        n: usize,
        cols: usize,
    ) -> Result<()> {
        let (name, threads) = if cols <= FUSED_SILU_MAX_COLS {
            let (k, threads) = fused::held_row_shape(cols, fused::QUANTIZE_MAX_THREADS);
            (format!("quantize_fp8_k{k}"), threads)
        } else {
            ("quantize_fp8".to_string(), ROW_THREADS)
        };
        self.go(
            &self.typed(&name),
            rows(n),
            threads,
            0,
            &[
                Arg::Ptr(out),
                Arg::Ptr(scales),
                Arg::Ptr(input),
                Arg::I32(cols as i32),
            ],
        )
    }

    /// The per-token FP8 scales [`Self::quantize_fp8`] would use, into `scales[n]`.
    pub fn fp8_row_scale(&self, scales: u64, input: u64, n: usize, cols: usize) -> Result<()> {
        self.go(
            &self.typed("fp8_row_scale"),
            rows(n),
            ROW_THREADS,
            0,
            &[Arg::Ptr(scales), Arg::Ptr(input), Arg::I32(cols as i32)],
        )
    }

    /// [`Self::quantize_fp8`] with the scales given (from [`Self::fp8_row_scale`]).
    pub fn quantize_fp8_scaled(
        &self,
        out: u64,
        scales: u64,
        input: u64,
        n: usize,
        cols: usize,
    ) -> Result<()> {
        self.go(
            &self.typed("quantize_fp8_scaled"),
            rows(n),
            ROW_THREADS,
            0,
            &[
                Arg::Ptr(out),
                Arg::Ptr(scales),
                Arg::Ptr(input),
                Arg::I32(cols as i32),
            ],
        )
    }

    /// [`Self::fake_quant_fp8_f32`] with the scales given.
    pub fn fake_quant_fp8_f32_scaled(
        &self,
        x: u64,
        scales: u64,
        n: usize,
        cols: usize,
    ) -> Result<()> {
        self.go(
            "fake_quant_fp8_f32_scaled",
            rows(n),
            ROW_THREADS,
            0,
            &[Arg::Ptr(x), Arg::Ptr(scales), Arg::I32(cols as i32)],
        )
    }

    /// In place on F32 rows: `x = e4m3(x / s) * s` with the row's dynamic FP8 scale `s`.
    pub fn fake_quant_fp8_f32(&self, x: u64, n: usize, cols: usize) -> Result<()> {
        self.go(
            "fake_quant_fp8_f32",
            rows(n),
            ROW_THREADS,
            0,
            &[Arg::Ptr(x), Arg::I32(cols as i32)],
        )
    }

    /// Writes each token's k/v heads (columns `k_col..`, `v_col..` of the qkv rows) to `slots[t]`.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        k_cache: u64,
        v_cache: u64,
        qkv: u64,
        slots: u64,
        n: usize,
        row_stride: usize,
        k_col: usize,
        v_col: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
    ) -> Result<()> {
        // 128 threads: a 70B token's 8 kv heads x 128 in 16-byte copies.
        self.go(
            &self.typed("kv_write"),
            rows(n),
            128,
            0,
            &[
                Arg::Ptr(k_cache),
                Arg::Ptr(v_cache),
                Arg::Ptr(qkv),
                Arg::Ptr(slots),
                Arg::I32(row_stride as i32),
                Arg::I32(k_col as i32),
                Arg::I32(v_col as i32),
                Arg::I32(kv_heads as i32),
                Arg::I32(head_dim as i32),
                Arg::I32(block_size as i32),
            ],
        )
    }

    /// One token per row of `logits[n, vocab]` (F32); `params[n, 4]` = temperature, top_k, top_p, uniform.
    /// A cluster of [`SAMPLE_CLUSTER`] blocks per row (the kernel's `__cluster_dims__`).
    pub fn sample_tokens(
        &self,
        out: u64,
        logits: u64,
        params: u64,
        n: usize,
        vocab: usize,
    ) -> Result<()> {
        self.go(
            "sample_tokens",
            ((n * SAMPLE_CLUSTER) as u32, 1, 1),
            1024,
            0,
            &[
                Arg::Ptr(out),
                Arg::Ptr(logits),
                Arg::Ptr(params),
                Arg::I32(vocab as i32),
            ],
        )
    }

    /// `tokens[pairs[2i]] = sampled[pairs[2i + 1]]` for `n` pairs (async scheduling).
    pub fn take_previous_tokens(
        &self,
        tokens: u64,
        sampled: u64,
        pairs: u64,
        n: usize,
    ) -> Result<()> {
        self.go(
            "take_previous_tokens",
            (n.div_ceil(256) as u32, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(tokens),
                Arg::Ptr(sampled),
                Arg::Ptr(pairs),
                Arg::I32(n as i32),
            ],
        )
    }

    fn fill(&self, name: &str, ptr: u64, n: usize, seed: u64, lo: f32, hi: f32) -> Result<()> {
        let blocks = n.div_ceil(256).clamp(1, 132 * 16) as u32;
        self.go(
            name,
            (blocks, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(ptr),
                Arg::U64(n as u64),
                Arg::U64(seed),
                Arg::F32(lo),
                Arg::F32(hi),
            ],
        )
    }

    /// Seeded uniform values in `[lo, hi)`, generated on the device.
    pub fn fill_bf16(&self, ptr: u64, n: usize, seed: u64, lo: f32, hi: f32) -> Result<()> {
        self.fill("fill_uniform_bf16", ptr, n, seed, lo, hi)
    }

    pub fn fill_fp8(&self, ptr: u64, n: usize, seed: u64, lo: f32, hi: f32) -> Result<()> {
        self.fill("fill_uniform_fp8", ptr, n, seed, lo, hi)
    }

    pub fn fill_f32(&self, ptr: u64, n: usize, seed: u64, lo: f32, hi: f32) -> Result<()> {
        self.fill("fill_uniform_f32", ptr, n, seed, lo, hi)
    }
}
