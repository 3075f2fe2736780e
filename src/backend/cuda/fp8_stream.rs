//! The FP8 weight-streaming product of `kernels/gemm_fp8.cu` for decode-sized batches:
//! `out[M, N] = (xq[M, K] · sx[M]) · (w[N, K] · sw[N])ᵀ`, both operands loaded by TMA.
//!
//! One CTA per SM; the weight chunks (64 rows x 512 k bytes) are split evenly between them, so
//! every shape keeps every SM streaming (see the kernel). The tensor maps are encoded on the host
//! (the weight's once, by the caller: [`weight_map`]; the activations' at each launch) and passed
//! by value, so a launch needs no device memory of its own and can be captured in a CUDA graph.
//! Up to [`MAX_TOKENS`] tokens a launch.

use super::device::DeviceBuffer;
use super::kernels::{launch, Arg, Kernels};
pub use super::tensor_map::TensorMap;
use super::tensor_map::{swizzled_2d, Element};
use anyhow::{ensure, Result};
use cudarc::driver::result;
use cudarc::driver::sys::CUstream;

/// Tokens per launch (8 token tiles of 8); larger M runs in chunks.
pub const MAX_TOKENS: usize = 64;
/// Weight rows per tile (the kernel's TG_ROWS), k bytes per chunk (TG_CHUNK_K).
const ROWS: usize = 64;
const CHUNK_K: usize = 512;
/// A producer warp and 4 consumer warps.
const THREADS: u32 = 160;
/// Shared memory: the stages' ring (TG_RING_BYTES), at most 5 stages' 2 mbarriers, a flag, and
/// 1 KB to align the stages to the swizzle's 1024-byte atoms.
pub const SHARED_BYTES: usize = 192 * 1024 + 5 * 16 + 16 + 1024;
// One CTA per SM: within the H200's 227 KB of shared memory per block.
const _: () = assert!(SHARED_BYTES <= 227 * 1024);
/// Floats of one CTA's partial sums (two slots of 64 rows x 64 tokens).
const PARTIAL_FLOATS_PER_CTA: usize = 2 * ROWS * 64;

/// The kernels, by token tiles and output type.
pub const KERNELS: &[&str] = &[
    "gemm_fp8_stream_t1_bf16",
    "gemm_fp8_stream_t2_bf16",
    "gemm_fp8_stream_t4_bf16",
    "gemm_fp8_stream_t8_bf16",
    "gemm_fp8_stream_t1_f32",
    "gemm_fp8_stream_t2_f32",
    "gemm_fp8_stream_t4_f32",
    "gemm_fp8_stream_t8_f32",
];

/// Row-tile counters (zeroed once; each launch leaves them zero again).
const COUNTERS: usize = 8192;

/// Scratch of the partial sums and their counters (the partial buffer is also the F32 staging of
/// the unscaled cuBLASLt path).
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

/// Can the kernel run this shape? (Rows a multiple of 16 bytes, as TMA needs; a counter per row
/// tile; 32-bit coordinates.)
pub fn supports(n: usize, k: usize) -> bool {
    n > 0
        && k > 0
        && k.is_multiple_of(16)
        && n.div_ceil(ROWS) <= COUNTERS
        && n <= i32::MAX as usize
        && k <= i32::MAX as usize
}

/// The tensor map of an e4m3 weight `[n, k]` at `w`: boxes of 64 rows x 128 bytes.
pub fn weight_map(w: u64, n: usize, k: usize) -> Result<TensorMap> {
    encode(w, n, k, ROWS)
}

/// The tensor map of `m` e4m3 activation rows `[m, k]` at `x`, read by the kernel of `tiles`
/// token tiles: boxes of 8 x tiles rows (tokens past `m` read as zeros) x 128 bytes.
pub fn activation_map(x: u64, m: usize, k: usize, tiles: usize) -> Result<TensorMap> {
    encode(x, m, k, 8 * tiles)
}

/// A map of the byte rows `[rows, k]` at `ptr` in boxes of `box_rows` x 128 bytes.
fn encode(ptr: u64, rows: usize, k: usize, box_rows: usize) -> Result<TensorMap> {
    ensure!(
        supports(rows, k),
        "FP8 streaming product: [{rows}, {k}] not supported"
    );
    swizzled_2d(ptr, Element::U8, rows, k, box_rows, 128)
}

/// Scratch bytes the partial sums of `sms` CTAs take.
pub fn partial_bytes(sms: usize) -> usize {
    sms * PARTIAL_FLOATS_PER_CTA * 4
}

/// Launches the product on `sms` SMs (one CTA each, fewer when the weight has fewer chunks);
/// `map` is the weight's [`weight_map`]. `out` is BF16, or F32 when `f32_out`.
/// `out` is BF16, or F32 when `f32_out`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    kernels: &Kernels,
    scratch: &StreamScratch,
    sms: usize,
    map: &TensorMap,
    m: usize,
    n: usize,
    k: usize,
    x: u64,
    x_scale: u64,
    w_scale: u64,
    out: u64,
    f32_out: bool,
    stream: CUstream,
) -> Result<()> {
    ensure!(
        supports(n, k),
        "FP8 streaming product: N={n} K={k} not supported (K a multiple of 16)"
    );
    let chunks = n.div_ceil(ROWS) * k.div_ceil(CHUNK_K);
    let grid = sms.min(chunks).max(1);
    ensure!(
        partial_bytes(grid) <= scratch.partial.bytes,
        "FP8 streaming product: the partial sums of {grid} CTAs exceed the scratch"
    );
    let out_bytes = if f32_out { 4 } else { 2 };
    for m0 in (0..m).step_by(MAX_TOKENS) {
        let mc = (m - m0).min(MAX_TOKENS);
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
        let x_map = activation_map(x + (m0 * k) as u64, mc, k, tiles)?;
        launch(
            kernels.get(&name)?,
            (grid as u32, 1, 1),
            (THREADS, 1, 1),
            SHARED_BYTES as u32,
            stream,
            &[
                Arg::TensorMap(*map),
                Arg::TensorMap(x_map),
                Arg::Ptr(out + (m0 * n * out_bytes) as u64),
                Arg::Ptr(scratch.partial.ptr),
                Arg::Ptr(scratch.counters.ptr),
                Arg::Ptr(x_scale + (m0 * 4) as u64),
                Arg::Ptr(w_scale),
                Arg::I32(mc as i32),
                Arg::I32(n as i32),
                Arg::I32(k as i32),
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
    fn supported_shapes_and_scratch_size() {
        assert!(supports(8192, 8192) && supports(57344, 8192) && supports(100, 16));
        assert!(!supports(8192, 100) && !supports(0, 16));
        assert_eq!(partial_bytes(132), 132 * 2 * 64 * 64 * 4);
    }
}
