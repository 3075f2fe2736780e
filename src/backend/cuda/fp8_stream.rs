//! The FP8 weight-streaming product of `kernels/gemm_fp8.cu` for decode-sized batches:
//! `out[M, N] = (xq[M, K] · sx[M]) · (w[N, K] · sw[N])ᵀ`, read once through the weights at HBM rate.
//!
//! One launch covers up to [`MAX_TOKENS`] tokens (8 token tiles of 8); larger M runs in chunks.
//! When the row blocks alone would leave SMs idle, K is split across CTAs (`splits`); the partial
//! sums go to `partial` and the last CTA of each row block reduces them (see the kernel).

use super::device::DeviceBuffer;
use super::kernels::{launch, Arg, Kernels};
use anyhow::{ensure, Result};
use cudarc::driver::{result, sys::CUstream};

/// Weight rows per CTA (the kernel's GEMM_ROWS) and k bytes per loop step (GEMM_KSTEP).
pub const ROWS_PER_BLOCK: usize = 64;
const KSTEP: usize = 256;
const THREADS: u32 = 128;
/// Tokens per launch (the kernel's largest token-tile count, 8, times 8).
pub const MAX_TOKENS: usize = 64;
/// Row-block counters (zeroed once; each launch leaves them zero again).
const COUNTERS: usize = 8192;
/// Fewest k bytes per split: shorter slices spend more on the partial sums than they gain.
const MIN_SPLIT_K: usize = 1024;

/// Scratch of the split-K reduction (also the F32 staging of the unscaled cuBLASLt path).
pub struct StreamScratch {
    pub partial: DeviceBuffer,
    counters: DeviceBuffer,
}

impl StreamScratch {
    pub fn new(partial_bytes: usize) -> Result<Self> {
        let counters = DeviceBuffer::new(COUNTERS * 4)?;
        // SAFETY: the buffer was just allocated with this size.
        unsafe { result::memset_d8_sync(counters.ptr, 0, COUNTERS * 4)? };
        Ok(Self {
            partial: DeviceBuffer::new(partial_bytes)?,
            counters,
        })
    }
}

/// Can the streaming kernel run this shape? (16-byte rows; enough counters for its row blocks.)
pub fn supports(n: usize, k: usize) -> bool {
    n > 0 && k > 0 && k.is_multiple_of(16) && n.div_ceil(ROWS_PER_BLOCK) <= COUNTERS
}

/// K splits for `m` tokens: enough CTAs for `target_blocks`, each split at least
/// [`MIN_SPLIT_K`] bytes of k, the partial sums within `partial_bytes`.
pub fn auto_splits(
    m: usize,
    n: usize,
    k: usize,
    target_blocks: usize,
    partial_bytes: usize,
) -> usize {
    let row_blocks = n.div_ceil(ROWS_PER_BLOCK);
    let want = (target_blocks + row_blocks / 2) / row_blocks;
    let by_k = (k / MIN_SPLIT_K).max(1);
    let m = m.clamp(1, MAX_TOKENS);
    let by_scratch = (partial_bytes / (m * n * 4)).max(1);
    want.min(by_k).min(by_scratch).max(1)
}

/// Launches the streaming product; `splits` = 1 writes `out` directly. `out` is BF16, or F32 when
/// `f32_out`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    kernels: &Kernels,
    scratch: &StreamScratch,
    m: usize,
    n: usize,
    k: usize,
    x: u64,
    x_scale: u64,
    w: u64,
    w_scale: u64,
    out: u64,
    f32_out: bool,
    splits: usize,
    stream: CUstream,
) -> Result<()> {
    ensure!(
        supports(n, k),
        "FP8 streaming GEMM: N={n} K={k} not supported (K a multiple of 16)"
    );
    let out_bytes = if f32_out { 4 } else { 2 };
    let row_blocks = n.div_ceil(ROWS_PER_BLOCK);
    for m0 in (0..m).step_by(MAX_TOKENS) {
        let mc = (m - m0).min(MAX_TOKENS);
        // Split length a multiple of the loop step (16 bytes at least for tiny K).
        let step = if k >= KSTEP { KSTEP } else { 16 };
        let k_per_split = k.div_ceil(splits.max(1)).div_ceil(step) * step;
        let grid_splits = k.div_ceil(k_per_split);
        ensure!(
            grid_splits == 1 || grid_splits * mc * n * 4 <= scratch.partial.bytes,
            "FP8 streaming GEMM: {grid_splits} splits of M={mc} N={n} exceed the scratch"
        );
        let tiles = match mc.div_ceil(8) {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => 8,
        };
        let name = format!(
            "gemm_fp8_stream_t{tiles}_{}",
            if f32_out { "f32" } else { "bf16" }
        );
        launch(
            kernels.get(&name)?,
            (row_blocks as u32, grid_splits as u32, 1),
            (THREADS, 1, 1),
            0,
            stream,
            &[
                Arg::Ptr(out + (m0 * n * out_bytes) as u64),
                Arg::Ptr(scratch.partial.ptr),
                Arg::Ptr(scratch.counters.ptr),
                Arg::Ptr(x + (m0 * k) as u64),
                Arg::Ptr(x_scale + (m0 * 4) as u64),
                Arg::Ptr(w),
                Arg::Ptr(w_scale),
                Arg::I32(mc as i32),
                Arg::I32(n as i32),
                Arg::I32(k as i32),
                Arg::I32(k_per_split as i32),
            ],
        )?;
    }
    Ok(())
}

/// `out[m, n] = acc[m, n] · sx[m] · sw[n]` (F32 in, BF16 out): the epilogue of an unscaled product.
#[allow(clippy::too_many_arguments)]
pub fn scale_rows_cols(
    kernels: &Kernels,
    m: usize,
    n: usize,
    acc: u64,
    x_scale: u64,
    w_scale: u64,
    out: u64,
    stream: CUstream,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let threads = 256u32;
    launch(
        kernels.get("scale_rows_cols_bf16")?,
        (m as u32, n.div_ceil(4 * threads as usize) as u32, 1),
        (threads, 1, 1),
        0,
        stream,
        &[
            Arg::Ptr(out),
            Arg::Ptr(acc),
            Arg::Ptr(x_scale),
            Arg::Ptr(w_scale),
            Arg::I32(n as i32),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_gpu_within_limits() {
        let big = 64 << 20;
        // o_proj 8192x8192: 128 row blocks, 528 target blocks -> 4 splits.
        assert_eq!(auto_splits(1, 8192, 8192, 528, big), 4);
        // gate_up 57344x8192: 896 row blocks fill the GPU alone.
        assert_eq!(auto_splits(1, 57344, 8192, 528, big), 1);
        // Tiny K: no split shorter than MIN_SPLIT_K.
        assert_eq!(auto_splits(1, 64, 512, 528, big), 1);
        // Scratch too small for the partial sums of 64 tokens.
        assert_eq!(auto_splits(64, 8192, 8192, 528, 2 * 64 * 8192 * 4), 2);
        assert!(supports(8192, 8192) && !supports(8192, 100));
    }
}
