//! Warms L2 with the head of the next linear's weights while the small kernels between two GEMMs
//! run (norms, RoPE, attention, SiLU: a few microseconds each at decode batch sizes, during which
//! HBM mostly idles). A side stream waits for the GEMM before, then one small kernel issues bulk
//! L2 prefetches of pieces spread evenly over the next weight matrix; the main stream never waits
//! for it, and every CTA of the next GEMM finds part of its tiles in L2. `TANDEM_L2_PREFETCH_MB`
//! sets the bytes per linear (0: off).

use super::device::Gpu;
use super::kernels::Kernels;
use super::ops::{Ops, Precision};
use anyhow::Result;
use cudarc::driver::{sys::CUstream, CudaEvent, CudaStream};
use std::sync::Arc;

/// Bytes per linear by default: about what HBM moves during the small kernels before a GEMM,
/// well inside the 50 MB L2 (the attention's KV reads share it).
const DEFAULT_MB: usize = 0;
/// Steps of at most this many tokens prefetch (decode-sized: their GEMMs are bandwidth-bound).
const MAX_TOKENS: usize = 64;

pub struct WeightPrefetch {
    stream: Arc<CudaStream>,
    gemm_done: CudaEvent,
    bytes: usize,
}

impl WeightPrefetch {
    /// The prefetcher `TANDEM_L2_PREFETCH_MB` asks for, if any.
    pub fn from_env(gpu: &Gpu) -> Result<Option<Self>> {
        let mb = std::env::var("TANDEM_L2_PREFETCH_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MB);
        if mb == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            stream: gpu.ctx.new_stream()?,
            gemm_done: gpu.ctx.new_event(None)?,
            bytes: mb << 20,
        }))
    }

    /// After the work queued on `main` so far, prefetches about `self.bytes` of the `bytes` at
    /// `weights` into L2 (spread over the whole matrix), for a step of `tokens` tokens.
    pub fn after(
        &self,
        kernels: &Kernels,
        main: &CudaStream,
        tokens: usize,
        weights: u64,
        bytes: usize,
    ) -> Result<()> {
        if tokens > MAX_TOKENS {
            return Ok(());
        }
        self.gemm_done.record(main)?;
        self.stream.wait(&self.gemm_done)?;
        let side: CUstream = self.stream.cu_stream();
        let ops = Ops {
            k: kernels,
            stream: side,
            act: Precision::Bf16,
        };
        ops.l2_prefetch(weights, bytes, self.bytes)
    }
}
