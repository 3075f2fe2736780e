//! Autotuning of cuBLASLt algorithms for decode-sized products. cuBLASLt's heuristic picks one
//! algorithm per shape; another of its candidates is sometimes faster. On a shape's first use
//! (always an eager step: decode graphs are captured on a shape's second step) each candidate runs
//! a few times on the real operands, timed with CUDA events, and the fastest is kept. Timings
//! differ between runs, so the choice (the candidate's rank in the heuristic's list, which is
//! fixed for a GPU and cuBLASLt version) is saved in the kernel cache folder, and every later
//! process on the machine takes the same one: the same algorithm, the same bits (tensor-parallel
//! ranks tune on their own, so within the first process they may differ).
//! On by default for products of at most [`DEFAULT_MAX_M`] rows: on H200s it shortened the 70B
//! decode step by 0.57-0.70 ms at batch 1, 8, 16 and 32 on one machine, by 0-0.27 ms on another
//! whose heuristic choices were faster to begin with, and was never slower
//! (benchmarks/results/cuda-h200-round11.json; round 5: 0.8-1.1 ms at batch 8). Larger products
//! (prefill chunks, whose many lengths would each cost a timing of large products) keep the
//! heuristic's choice.
//! `TANDEM_GEMM_AUTOTUNE=0` tunes nothing, `=1` every shape.

use super::device::DeviceBuffer;
use anyhow::{anyhow, Result};
use cudarc::cublaslt::sys;
use cudarc::driver::{result, sys as drv};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Candidates asked of the heuristic.
pub const MAX_CANDIDATES: usize = 8;
/// Timed launches per candidate (after one warm-up); the median counts.
const REPS: usize = 7;

/// Rows (tokens) of the largest product tuned by default: decode batches up to vLLM's default
/// `--max-num-seqs`.
pub const DEFAULT_MAX_M: usize = 256;

/// The largest product tuned (0: none), by `TANDEM_GEMM_AUTOTUNE` (`0`, `1`, or unset).
pub fn max_m() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| match std::env::var("TANDEM_GEMM_AUTOTUNE").as_deref() {
        Ok("0") => 0,
        Ok("1") => usize::MAX,
        _ => DEFAULT_MAX_M,
    })
}

pub fn enabled() -> bool {
    max_m() > 0
}

/// Whether `stream` is being captured into a graph (timing then has to wait for an eager use).
// CUDA handles are opaque to Rust: the driver checks them, nothing here dereferences them.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn capturing(stream: drv::CUstream) -> Result<bool> {
    let mut status = drv::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: a query of a live stream into an out-parameter.
    unsafe { drv::cuStreamIsCapturing(stream, &mut status) }
        .result()
        .map_err(|e| anyhow!("cuStreamIsCapturing: {e:?}"))?;
    Ok(status != drv::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// The heuristic's usable candidates for a matmul, best-ranked first (at least one, or an error).
///
/// # Safety
/// The handle, descriptor, layouts and preference must be live.
pub unsafe fn candidates(
    handle: sys::cublasLtHandle_t,
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    pref: sys::cublasLtMatmulPreference_t,
    count: usize,
) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
    let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
        vec![std::mem::zeroed(); count.max(1)];
    let mut found = 0i32;
    let [a, b, d] = layouts;
    sys::cublasLtMatmulAlgoGetHeuristic(
        handle,
        desc,
        a,
        b,
        d,
        d,
        pref,
        results.len() as i32,
        results.as_mut_ptr(),
        &mut found,
    )
    .result()
    .map_err(|e| anyhow!("cuBLASLt heuristic: {e:?}"))?;
    let algos: Vec<_> = results[..found.max(0) as usize]
        .iter()
        .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
        .map(|r| r.algo)
        .collect();
    if algos.is_empty() {
        return Err(anyhow!("cuBLASLt has no algorithm"));
    }
    Ok(algos)
}

/// Index of the fastest of `count` candidates, `launch(i)` running candidate `i` on `stream`
/// (a candidate whose launch fails is skipped; the first is kept if all fail).
///
/// Each launch is timed alone, after a write of [`FLUSH_BYTES`] that evicts L2, and a candidate
/// scores its median. Timed back to back, launches after the first read a weight that fits in L2
/// (the tensor-parallel ranks' qkv and o, 32-40 MB at TP2) from L2, and host launch gaps fall
/// inside the timing: two processes of one binary chose differently for TP2 at batch 1 (o_proj
/// 1.4 against 2.6 ms a step in the eager profile, decode step 13.4 against 14.5 ms).
// CUDA handles are opaque to Rust: the driver checks them, nothing here dereferences them.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn fastest(
    stream: drv::CUstream,
    count: usize,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Result<usize> {
    // Without the memory (the timing then runs without flushes) the product still runs.
    let flush = DeviceBuffer::new(FLUSH_BYTES)
        .inspect_err(|e| tracing::debug!("no L2 flush buffer for GEMM autotuning: {e:#}"))
        .ok();
    let events = (0..2 * REPS)
        .map(|_| result::event::create(drv::CUevent_flags::CU_EVENT_DEFAULT))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut best = (0, f32::INFINITY);
    for i in 0..count {
        if launch(i).is_err() {
            continue;
        }
        // SAFETY: live events, stream and flush buffer; the events are destroyed below.
        let ms = unsafe {
            let mut ok = true;
            for rep in 0..REPS {
                if let Some(f) = &flush {
                    result::memset_d8_async(f.ptr, rep as u8, FLUSH_BYTES, stream)?;
                }
                result::event::record(events[2 * rep], stream)?;
                ok &= launch(i).is_ok();
                result::event::record(events[2 * rep + 1], stream)?;
            }
            result::event::synchronize(events[2 * REPS - 1])?;
            let mut times = Vec::with_capacity(REPS);
            for rep in 0..REPS {
                times.push(result::event::elapsed(
                    events[2 * rep],
                    events[2 * rep + 1],
                )?);
            }
            times.sort_by(f32::total_cmp);
            if ok {
                times[REPS / 2]
            } else {
                f32::INFINITY
            }
        };
        if ms < best.1 {
            best = (i, ms);
        }
    }
    for e in events {
        // SAFETY: created above, destroyed once.
        let _ = unsafe { result::event::destroy(e) };
    }
    Ok(best.0)
}

/// Bytes written between timed launches: more than the H200's 50 MB of L2.
const FLUSH_BYTES: usize = 128 << 20;

/// The choices made on this machine (candidate rank per GPU, cuBLASLt version and shape), read
/// from and saved to one JSON file. An unreadable or unwritable file only costs a re-tune.
pub struct TuneCache {
    path: PathBuf,
    /// GPU name and cuBLASLt version: part of every key.
    machine: String,
    choices: BTreeMap<String, usize>,
}

impl TuneCache {
    pub fn open(path: PathBuf, machine: String) -> Self {
        let choices = read(&path);
        Self {
            path,
            machine,
            choices,
        }
    }

    /// The cache beside the compiled kernels, for the current GPU.
    pub fn for_current_gpu() -> Self {
        let gpu = current_gpu_name().unwrap_or_else(|| "unknown GPU".into());
        // SAFETY: a plain query of the loaded library.
        let version = unsafe { sys::cublasLtGetVersion() };
        Self::open(
            super::kernels::cache_dir().join("cublaslt-choices.json"),
            format!("{gpu} / cuBLASLt {version}"),
        )
    }

    fn key(&self, shape: &str) -> String {
        format!("{} / {shape}", self.machine)
    }

    pub fn get(&self, shape: &str) -> Option<usize> {
        self.choices.get(&self.key(shape)).copied()
    }

    /// Records a choice and saves the file (merged with what other processes saved meanwhile).
    pub fn put(&mut self, shape: &str, rank: usize) {
        let key = self.key(shape);
        self.choices.insert(key.clone(), rank);
        let mut on_disk = read(&self.path);
        on_disk.insert(key, rank);
        if let (Some(dir), Ok(text)) = (self.path.parent(), serde_json::to_string_pretty(&on_disk))
        {
            // One temporary file per writer (tensor-parallel ranks are threads of one process).
            static WRITES: AtomicUsize = AtomicUsize::new(0);
            let n = WRITES.fetch_add(1, Ordering::Relaxed);
            let tmp = self
                .path
                .with_extension(format!("tmp{}-{n}", std::process::id()));
            if std::fs::create_dir_all(dir).is_ok() && std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &self.path);
            }
        }
    }
}

fn read(path: &PathBuf) -> BTreeMap<String, usize> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn current_gpu_name() -> Option<String> {
    let mut dev = 0;
    // SAFETY: an out-parameter; fails cleanly without a current context.
    unsafe { drv::cuCtxGetDevice(&mut dev) }.result().ok()?;
    result::device::get_name(dev).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_persist_per_machine_and_merge_between_writers() {
        let dir = std::env::temp_dir().join(format!("tandem-tune-{}", std::process::id()));
        let path = dir.join("choices.json");
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = TuneCache::open(path.clone(), "GPU A / 1".into());
        let mut b = TuneCache::open(path.clone(), "GPU A / 1".into());
        assert_eq!(a.get("Fp8Unscaled 1x8192x8192"), None);
        a.put("Fp8Unscaled 1x8192x8192", 3);
        b.put("Fp8Unscaled 32x8192x8192", 1);
        let again = TuneCache::open(path.clone(), "GPU A / 1".into());
        assert_eq!(again.get("Fp8Unscaled 1x8192x8192"), Some(3));
        assert_eq!(again.get("Fp8Unscaled 32x8192x8192"), Some(1));
        // Another GPU or library version does not take these choices.
        let other = TuneCache::open(path.clone(), "GPU B / 1".into());
        assert_eq!(other.get("Fp8Unscaled 1x8192x8192"), None);
        // A damaged file reads as empty.
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(
            TuneCache::open(path, "GPU A / 1".into()).get("Fp8Unscaled 1x8192x8192"),
            None
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
