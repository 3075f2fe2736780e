//! Autotuning of cuBLASLt algorithms (opt-in: `TANDEM_GEMM_AUTOTUNE=1`). cuBLASLt's heuristic picks
//! one algorithm per shape; at decode sizes another of its candidates is sometimes faster. On a
//! plan's first use each candidate runs a few times on the real operands, timed with CUDA events,
//! and the fastest is kept. The choice follows timings, so it can differ between processes (and
//! with it the last bits of a sum); hence off by default.

use anyhow::{anyhow, Result};
use cudarc::cublaslt::sys;
use cudarc::driver::{result, sys as drv};
use std::sync::OnceLock;

/// Candidates asked of the heuristic.
pub const MAX_CANDIDATES: usize = 8;
/// Timed launches per candidate (after one warm-up).
const REPS: usize = 5;

pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TANDEM_GEMM_AUTOTUNE").is_ok_and(|v| v == "1"))
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
pub fn fastest(
    stream: drv::CUstream,
    count: usize,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Result<usize> {
    let start = result::event::create(drv::CUevent_flags::CU_EVENT_DEFAULT)?;
    let end = result::event::create(drv::CUevent_flags::CU_EVENT_DEFAULT)?;
    let mut best = (0, f32::INFINITY);
    for i in 0..count {
        if launch(i).is_err() {
            continue;
        }
        // SAFETY: live events and stream; the events are destroyed below.
        let ms = unsafe {
            result::event::record(start, stream)?;
            let mut ok = true;
            for _ in 0..REPS {
                ok &= launch(i).is_ok();
            }
            result::event::record(end, stream)?;
            result::event::synchronize(end)?;
            if ok {
                result::event::elapsed(start, end)?
            } else {
                f32::INFINITY
            }
        };
        if ms < best.1 {
            best = (i, ms);
        }
    }
    // SAFETY: created above, destroyed once.
    unsafe {
        let _ = result::event::destroy(start);
        let _ = result::event::destroy(end);
    }
    Ok(best.0)
}
