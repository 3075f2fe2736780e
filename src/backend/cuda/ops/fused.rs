//! The fusions that write an FP8 linear's quantized input directly (the same bits as the unfused
//! kernel followed by `quantize_fp8`), and rope fused with the paged KV write.

use super::{rows, Fp8KvScales, Ops, Precision, NORM_CHUNK_COLS, ROPE_THREADS};
use crate::backend::cuda::kernels::{Arg, SILU_SMEM_MAX_BYTES};
use crate::backend::cuda::peer_all_reduce::PeerCall;
use anyhow::{ensure, Result};

/// The fused kernels hold a row in registers, one block per row: at most 32 warps and
/// FUSED_MAX_K chunks (norm) or 8-column groups (silu) per warp lane / thread.
const FUSED_MAX_K: usize = 8;
const SILU_GROUP_COLS: usize = 8;
pub const FUSED_NORM_MAX_COLS: usize = 32 * FUSED_MAX_K * NORM_CHUNK_COLS;
pub const FUSED_SILU_MAX_COLS: usize = 1024 * FUSED_MAX_K * SILU_GROUP_COLS;
/// Many rows (prefill): the fused norm runs as 8-warp blocks, 3 per SM (`add_rmsnorm_fp8_rows`),
/// for rows of at most 64 chunks; fewer rows get up to 32 warps per row to spread the work.
const NORM_ROWS_MIN_ROWS: usize = 256;
const NORM_ROWS_MAX_CHUNKS: usize = 8 * FUSED_MAX_K;

/// silu_mul_fp8 below this many rows: split rows, blocks of SPLIT_THREADS x 4 = SPLIT_COLS columns.
/// A row per block takes ~14 us for a 70B row (28672 columns: one SM's expf and divisions), the
/// split pair 9.4 us at 1 row and 12.5 us at 32 (H200; 3000 rows: 0.32 vs 0.58 ms).
pub const SILU_SPLIT_BELOW_ROWS: usize = 64;
const SPLIT_THREADS: u32 = 128;
const SPLIT_COLS: usize = 512;

/// The smallest K in 1, 2, 4, 8 with `units` <= `lanes` * K.
fn fused_k(units: usize, lanes: usize) -> usize {
    let mut k = 1;
    while k < FUSED_MAX_K && units > lanes * k {
        k *= 2;
    }
    k
}

/// The fused norm's kernel (by K) and threads per block: warps * K >= the row's chunks.
fn fused_norm_shape(n: usize, hidden: usize) -> (String, u32) {
    let chunks = hidden.div_ceil(NORM_CHUNK_COLS);
    if n >= NORM_ROWS_MIN_ROWS && chunks <= NORM_ROWS_MAX_CHUNKS {
        return ("add_rmsnorm_fp8_rows".to_string(), 256);
    }
    let (k, threads) = fused_norm_k(hidden);
    (format!("add_rmsnorm_fp8_k{k}"), threads)
}

/// The arguments the fused norms share (`add_rmsnorm_fp8*`; the peer variant appends its own).
fn norm_args(
    residual: u64,
    delta: u64,
    weight: u64,
    xq: u64,
    xs: u64,
    hidden: usize,
    eps: f32,
) -> [Arg; 7] {
    [
        Arg::Ptr(residual),
        Arg::Ptr(delta),
        Arg::Ptr(weight),
        Arg::Ptr(xq),
        Arg::Ptr(xs),
        Arg::I32(hidden as i32),
        Arg::F32(eps),
    ]
}

/// K and threads per block of the row-per-block fused norm (`add_rmsnorm_fp8[_acc]_k*`).
fn fused_norm_k(hidden: usize) -> (usize, u32) {
    let chunks = hidden.div_ceil(NORM_CHUNK_COLS);
    let k = fused_k(chunks, 32);
    (k, 32 * chunks.div_ceil(k) as u32)
}

/// K and threads per block of the row-per-block kernels that hold a row in registers as groups of
/// 8 columns (`silu_mul_fp8_k*`, `quantize_fp8_k*`): the smallest K with at most `max_threads`
/// threads of K groups covering the row (when K <= 8 allows; else up to 1024 threads).
pub(super) fn held_row_shape(cols: usize, max_threads: usize) -> (usize, u32) {
    let groups = cols.div_ceil(SILU_GROUP_COLS);
    let lanes = if groups <= max_threads * FUSED_MAX_K {
        max_threads
    } else {
        1024
    };
    let k = fused_k(groups, lanes);
    (k, 32 * groups.div_ceil(k).div_ceil(32) as u32)
}

/// Threads per block of silu_mul_fp8 (every thread issues all its K loads at once: more threads,
/// fewer groups each) and of quantize_fp8 (measured: 8192 BF16 columns take 2.35 ms per 3000-token
/// 70B prefill as 512 threads x 2 groups, 2.94 ms as 1024 x 1).
pub(super) const SILU_MAX_THREADS: usize = 1024;
pub(super) const QUANTIZE_MAX_THREADS: usize = 512;

/// rope_kv_write's grid.y and threads: a thread per rotary pair index of up to ROPE_THREADS / half
/// heads at a time (its angle computed once); many rows take all of a row's heads in one block,
/// few rows spread a row over blocks of one head group each.
fn rope_kv_write_shape(n: usize, heads: usize, head_dim: usize) -> (u32, u32) {
    let half = (head_dim / 2).max(1);
    let groups = (ROPE_THREADS as usize / half).max(1);
    let head_blocks = if n >= ROPE_ROWS_PER_BLOCK_FROM {
        1
    } else {
        heads.div_ceil(groups)
    };
    (head_blocks as u32, (groups * half) as u32)
}
/// From this many rows on, rope_kv_write runs one block per row.
const ROPE_ROWS_PER_BLOCK_FROM: usize = 256;

impl Ops<'_> {
    /// [`Self::add_rmsnorm`] then [`Self::quantize_fp8`] of its output in one launch: writes the
    /// residual, `xq` and `xs` (not the normalized row), the same bits as the unfused pair. One
    /// block per row, the row in registers. `hidden` <= [`FUSED_NORM_MAX_COLS`].
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm_fp8(
        &self,
        residual: u64,
        delta: u64,
        weight: u64,
        xq: u64,
        xs: u64,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        ensure!(
            hidden <= FUSED_NORM_MAX_COLS,
            "fused norm of {hidden} columns (at most {FUSED_NORM_MAX_COLS})"
        );
        let (name, threads) = fused_norm_shape(n, hidden);
        let args = norm_args(residual, delta, weight, xq, xs, hidden, eps);
        self.go(&self.typed(&name), rows(n), threads, 0, &args)
    }

    /// [`Self::add_rmsnorm_fp8`] with `delta` this rank's part of a row-parallel product, summed
    /// over the tensor-parallel ranks first (`peer`, from `PeerAllReduce::norm_call`): the bits
    /// of the peer all-reduce followed by the fused norm. BF16; `delta` rows 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm_fp8_peer(
        &self,
        residual: u64,
        delta: u64,
        weight: u64,
        xq: u64,
        xs: u64,
        n: usize,
        hidden: usize,
        eps: f32,
        peer: PeerCall,
    ) -> Result<()> {
        ensure!(
            self.act == Precision::Bf16
                && hidden <= FUSED_NORM_MAX_COLS
                && hidden.is_multiple_of(8)
                && delta.is_multiple_of(16),
            "fused all-reduce and norm: BF16, at most {FUSED_NORM_MAX_COLS} columns in whole 16-byte pieces"
        );
        let (k, threads) = fused_norm_k(hidden);
        let args = [
            norm_args(residual, delta, weight, xq, xs, hidden, eps).as_slice(),
            &peer.args(),
        ]
        .concat();
        self.go(
            &format!("add_rmsnorm_fp8_peer_k{k}_bf16"),
            rows(n),
            threads,
            0,
            &args,
        )
    }

    /// [`Self::add_rmsnorm_fp8`] with the delta still in the F32 accumulator `acc` of an unscaled
    /// FP8 product whose token scales are in `xs` (overwritten with this kernel's) and channel
    /// scales in `acc_sw`: the same bits as the product's epilogue followed by the fused norm, one
    /// launch fewer. BF16 activations; a block per row at any row count.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm_fp8_acc(
        &self,
        residual: u64,
        acc: u64,
        acc_sw: u64,
        weight: u64,
        xq: u64,
        xs: u64,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        ensure!(
            self.act == Precision::Bf16 && hidden <= FUSED_NORM_MAX_COLS,
            "fused norm of an unscaled product: BF16 and at most {FUSED_NORM_MAX_COLS} columns"
        );
        let (k, threads) = fused_norm_k(hidden);
        self.go(
            &format!("add_rmsnorm_fp8_acc_k{k}_bf16"),
            rows(n),
            threads,
            0,
            &[
                Arg::Ptr(residual),
                Arg::Ptr(acc),
                Arg::Ptr(acc_sw),
                Arg::Ptr(weight),
                Arg::Ptr(xq),
                Arg::Ptr(xs),
                Arg::I32(hidden as i32),
                Arg::F32(eps),
            ],
        )
    }

    /// Bytes of `scratch` that [`Self::silu_mul_fp8`] needs for up to `n` rows of `inter` (only
    /// the split path for fewer than [`SILU_SPLIT_BELOW_ROWS`] rows uses it).
    pub fn fused_silu_scratch_bytes(n: usize, inter: usize) -> usize {
        // Each split row's partial maxima, then (the unscaled-input pair) its input scale.
        4 * n.min(SILU_SPLIT_BELOW_ROWS - 1) * (inter.div_ceil(SPLIT_COLS) + 1)
    }

    /// [`Self::silu_mul_fp8`] of `gate_up` still in the F32 accumulator `acc` of an unscaled FP8
    /// product (token scales in `xs`, overwritten with this pair's; channel scales `acc_sw`): the
    /// same bits as the product's epilogue followed by the fused silu, one launch fewer. BF16
    /// activations, fewer than [`SILU_SPLIT_BELOW_ROWS`] rows (the split pair).
    #[allow(clippy::too_many_arguments)]
    pub fn silu_mul_fp8_acc(
        &self,
        xq: u64,
        xs: u64,
        acc: u64,
        acc_sw: u64,
        scratch: u64,
        n: usize,
        inter: usize,
    ) -> Result<()> {
        ensure!(
            self.act == Precision::Bf16 && n < SILU_SPLIT_BELOW_ROWS,
            "fused silu of an unscaled product: BF16 and fewer than {SILU_SPLIT_BELOW_ROWS} rows"
        );
        let grid = (inter.div_ceil(SPLIT_COLS) as u32, n as u32, 1);
        let i = Arg::I32(inter as i32);
        let (acc, sw, scratch) = (Arg::Ptr(acc), Arg::Ptr(acc_sw), Arg::Ptr(scratch));
        self.go(
            "silu_split_amax_acc_bf16",
            grid,
            SPLIT_THREADS,
            0,
            &[acc, Arg::Ptr(xs), sw, scratch, i],
        )?;
        self.go(
            "silu_split_quant_acc_bf16",
            grid,
            SPLIT_THREADS,
            0,
            &[Arg::Ptr(xq), Arg::Ptr(xs), acc, sw, scratch, i],
        )
    }

    /// [`Self::silu_mul`] then [`Self::quantize_fp8`] of its output, the same bits as the unfused
    /// pair. From [`SILU_SPLIT_BELOW_ROWS`] rows on, one launch: a block per row reads `gate_up`
    /// once and keeps the products in shared memory (BF16 rows up to [`SILU_SMEM_MAX_BYTES`] of
    /// products, several rows an SM) or else in registers (a row an SM). Fewer rows (decode) are
    /// split over blocks of 512 columns in two launches (partial maxima into `scratch`,
    /// [`Self::fused_silu_scratch_bytes`]), which spreads a row over many SMs.
    /// `inter` <= [`FUSED_SILU_MAX_COLS`].
    pub fn silu_mul_fp8(
        &self,
        xq: u64,
        xs: u64,
        gate_up: u64,
        scratch: u64,
        n: usize,
        inter: usize,
    ) -> Result<()> {
        ensure!(
            inter <= FUSED_SILU_MAX_COLS,
            "fused silu_mul of {inter} columns (at most {FUSED_SILU_MAX_COLS})"
        );
        if n < SILU_SPLIT_BELOW_ROWS {
            let grid = (inter.div_ceil(SPLIT_COLS) as u32, n as u32, 1);
            let i = Arg::I32(inter as i32);
            self.go(
                &self.typed("silu_split_amax"),
                grid,
                SPLIT_THREADS,
                0,
                &[Arg::Ptr(gate_up), Arg::Ptr(scratch), i],
            )?;
            return self.go(
                &self.typed("silu_split_quant"),
                grid,
                SPLIT_THREADS,
                0,
                &[
                    Arg::Ptr(xq),
                    Arg::Ptr(xs),
                    Arg::Ptr(gate_up),
                    Arg::Ptr(scratch),
                    i,
                ],
            );
        }
        let args = [
            Arg::Ptr(xq),
            Arg::Ptr(xs),
            Arg::Ptr(gate_up),
            Arg::I32(inter as i32),
        ];
        let smem = inter.div_ceil(8) * 16;
        if self.act == Precision::Bf16 && smem <= SILU_SMEM_MAX_BYTES {
            return self.go("silu_mul_fp8_smem_bf16", rows(n), 256, smem as u32, &args);
        }
        let (k, threads) = held_row_shape(inter, SILU_MAX_THREADS);
        self.go(
            &self.typed(&format!("silu_mul_fp8_k{k}")),
            rows(n),
            threads,
            0,
            &args,
        )
    }

    /// [`Self::rope`] then [`Self::kv_write`] in one launch (the same bits): rotates the q and k
    /// heads of rows laid out q | k | v (`row_stride` = (q_heads + 2 kv_heads) * head_dim) in
    /// place and writes each token's k and v heads to `slots[t]` (< 0: skipped); into an FP8 pool
    /// with `kv_fp8`'s scales (e4m3 of the BF16 value over the scale, saturating). With
    /// `unscaled` (accumulator, token scales, channel scales: an unscaled FP8 qkv product) the
    /// rows are read from the accumulator as the product's epilogue would have stored them, the
    /// same bits one launch fewer (BF16); the rotated q and k heads still go to `qkv`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_write(
        &self,
        qkv: u64,
        unscaled: Option<[u64; 3]>,
        k_cache: u64,
        v_cache: u64,
        positions: u64,
        inv_freq: u64,
        slots: u64,
        n: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        kv_fp8: Option<Fp8KvScales>,
    ) -> Result<()> {
        ensure!(
            head_dim.is_multiple_of(2) && head_dim <= 2048,
            "rope of head_dim {head_dim} (even, at most 2048)"
        );
        let (head_blocks, threads) = rope_kv_write_shape(n, q_heads + 2 * kv_heads, head_dim);
        ensure!(
            (kv_fp8.is_none() && unscaled.is_none()) || self.act == Precision::Bf16,
            "an FP8 KV pool or an unscaled qkv takes BF16 activations"
        );
        let acc = if unscaled.is_some() { "_acc" } else { "" };
        let (name, scales) = match kv_fp8 {
            Some(s) => (
                format!("rope_kv_write{acc}_kv8_bf16"),
                vec![Arg::F32(1.0 / s.k), Arg::F32(1.0 / s.v)],
            ),
            None if unscaled.is_some() => ("rope_kv_write_acc_bf16".to_string(), vec![]),
            None => (self.typed("rope_kv_write"), vec![]),
        };
        let unscaled: Vec<Arg> = unscaled.iter().flatten().map(|&p| Arg::Ptr(p)).collect();
        let args = [
            &[Arg::Ptr(qkv)][..],
            &unscaled,
            &[
                Arg::Ptr(k_cache),
                Arg::Ptr(v_cache),
                Arg::Ptr(positions),
                Arg::Ptr(inv_freq),
                Arg::Ptr(slots),
                Arg::I32(((q_heads + 2 * kv_heads) * head_dim) as i32),
                Arg::I32(q_heads as i32),
                Arg::I32(kv_heads as i32),
                Arg::I32(head_dim as i32),
                Arg::I32(block_size as i32),
            ][..],
            &scales,
        ]
        .concat();
        self.go(&name, (n as u32, head_blocks, 1), threads, 0, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every fused row fits its block: at most 1024 threads, and warps x K chunks (norm) or
    /// threads x K groups (silu) cover the row, which the kernels assume.
    #[test]
    fn fused_shapes_cover_their_rows() {
        for hidden in 1..=FUSED_NORM_MAX_COLS {
            for n in [1, NORM_ROWS_MIN_ROWS] {
                let (name, threads) = fused_norm_shape(n, hidden);
                let k: usize = match name.strip_prefix("add_rmsnorm_fp8_k") {
                    Some(k) => k.parse().unwrap(),
                    None => {
                        assert_eq!(name, "add_rmsnorm_fp8_rows");
                        FUSED_MAX_K
                    }
                };
                assert!(threads <= 1024 && threads % 32 == 0, "{hidden}: {threads}");
                assert!(
                    (threads as usize / 32) * k * NORM_CHUNK_COLS >= hidden,
                    "{hidden}"
                );
            }
        }
        assert_eq!(
            fused_norm_shape(1, 8192),
            ("add_rmsnorm_fp8_k2".into(), 1024)
        );
        for inter in 1..=FUSED_SILU_MAX_COLS {
            let (k, threads) = held_row_shape(inter, SILU_MAX_THREADS);
            assert!(threads <= 1024 && threads % 32 == 0 && k <= FUSED_MAX_K);
            assert!(threads as usize * k * SILU_GROUP_COLS >= inter, "{inter}");
        }
        assert_eq!(held_row_shape(28672, SILU_MAX_THREADS), (4, 896));
        assert_eq!(held_row_shape(8192, QUANTIZE_MAX_THREADS), (2, 512));
        for cols in [1, 1000, 8192, 28672, 32768, 32769, 65536] {
            let (k, threads) = held_row_shape(cols, QUANTIZE_MAX_THREADS);
            assert!(threads <= 1024 && k <= FUSED_MAX_K);
            assert!(threads as usize * k * SILU_GROUP_COLS >= cols, "{cols}");
        }
    }
}
