//! The linears of a layer (qkv, o, gate_up, down) in each precision: FP8 with dynamic per-token
//! input scales (optionally over the whole row of all tensor-parallel ranks), BF16, F32.

use super::super::ops::{Ops, Precision, FUSED_NORM_MAX_COLS, FUSED_SILU_MAX_COLS};
use super::super::weights::{GpuLinear, GpuWeights};
use super::CudaBackend;
use anyhow::{bail, Result};

#[derive(Clone, Copy)]
pub(super) enum Lin {
    Qkv(usize),
    O(usize),
    GateUp(usize),
    Down(usize),
}

/// The weights of `lin` and its profile label (a free function: it borrows only the weights).
fn weight(weights: &GpuWeights, lin: Lin) -> (&GpuLinear, &'static str) {
    let layer = match lin {
        Lin::Qkv(i) | Lin::O(i) | Lin::GateUp(i) | Lin::Down(i) => &weights.layers[i],
    };
    match lin {
        Lin::Qkv(_) => (&layer.qkv, "gemm qkv"),
        Lin::O(_) => (&layer.o, "gemm o"),
        Lin::GateUp(_) => (&layer.gate_up, "gemm gate_up"),
        Lin::Down(_) => (&layer.down, "gemm down"),
    }
}

impl CudaBackend {
    pub(super) fn linear(&mut self, lin: Lin, x: u64, m: usize, out: u64) -> Result<()> {
        let stream = self.gpu.cu_stream();
        let (xq, xs) = (self.ws.xq.ptr, self.ws.xs.ptr);
        let (l, label) = weight(&self.weights, lin);
        match l {
            GpuLinear::Bf16 { w, n, k } => {
                self.gemm.bf16(m, *n, *k, x, w.ptr, out, false, stream)?
            }
            GpuLinear::F32 { w, n, k, fp8_input } => {
                if *fp8_input {
                    // Inputs are this linear's alone (xn, attn, act), so rounding in place is safe.
                    let ops = Ops {
                        k: &self.kernels,
                        stream,
                        act: self.opts.precision,
                    };
                    if self.whole_row_scales(lin) {
                        ops.fp8_row_scale(xs, x, m, *k)?;
                        self.tp_max_scales(xs, m)?;
                        ops.fake_quant_fp8_f32_scaled(x, xs, m, *k)?;
                    } else {
                        ops.fake_quant_fp8_f32(x, m, *k)?;
                    }
                    self.profiler.mark("quantize fp8", stream)?;
                }
                self.gemm.f32(m, *n, *k, x, w.ptr, out, stream)?
            }
            GpuLinear::Fp8 { k, .. } => {
                let ops = Ops {
                    k: &self.kernels,
                    stream,
                    act: self.opts.precision,
                };
                if self.whole_row_scales(lin) {
                    ops.fp8_row_scale(xs, x, m, *k)?;
                    self.tp_max_scales(xs, m)?;
                    ops.quantize_fp8_scaled(xq, xs, x, m, *k)?;
                } else {
                    ops.quantize_fp8(xq, xs, x, m, *k)?;
                }
                self.profiler.mark("quantize fp8", stream)?;
                return self.linear_quantized(lin, m, out);
            }
        }
        self.mark(label)
    }

    /// Does `lin` take its FP8 input scales over the whole row of all ranks?
    fn whole_row_scales(&self, lin: Lin) -> bool {
        self.tp.is_some()
            && self.opts.tp_whole_row_fp8_scales
            && matches!(lin, Lin::O(_) | Lin::Down(_))
    }

    /// Max-reduces `m` per-token scales over the ranks (profiled with the quantization).
    fn tp_max_scales(&self, scales: u64, m: usize) -> Result<()> {
        match &self.tp {
            Some(tp) => tp.all_reduce_max_f32(scales, m, self.gpu.cu_stream()),
            None => Ok(()),
        }
    }

    /// Is `lin` an FP8 linear whose input a fused kernel may quantize (rows of `cols` <= `max`)?
    /// Not when its scales span the ranks (the fused kernels scale the rank's slice).
    pub(super) fn fp8_fusable(&self, lin: Lin, cols: usize, max: usize) -> bool {
        if self.whole_row_scales(lin) {
            return false;
        }
        matches!(weight(&self.weights, lin).0, GpuLinear::Fp8 { .. }) && cols <= max
    }

    /// The FP8 linear `lin` of the input already quantized in `ws.xq` / `ws.xs`.
    pub(super) fn linear_quantized(&mut self, lin: Lin, m: usize, out: u64) -> Result<()> {
        let stream = self.gpu.cu_stream();
        let (xq, xs) = (self.ws.xq.ptr, self.ws.xs.ptr);
        let f32_out = self.opts.precision == Precision::F32;
        let (l, label) = weight(&self.weights, lin);
        let GpuLinear::Fp8 { w, scale, n, k } = l else {
            bail!("a quantized input for a linear that is not FP8");
        };
        self.gemm.fp8_linear(
            &self.kernels,
            m,
            *n,
            *k,
            xq,
            xs,
            w.ptr,
            scale.ptr,
            out,
            f32_out,
            stream,
        )?;
        self.mark(label)
    }

    /// Adds `delta` (0: nothing) to the residual stream, RMS-normalizes it with `norm_w` and runs
    /// `lin` on the result: for an FP8 linear the norm writes the quantized input directly.
    pub(super) fn norm_linear(
        &mut self,
        lin: Lin,
        delta: u64,
        norm_w: u64,
        n: usize,
        out: u64,
    ) -> Result<()> {
        let (h, eps) = (self.config.hidden_size, self.config.rms_norm_eps as f32);
        let ws = &self.ws;
        let (residual, xn, xq, xs) = (ws.residual.ptr, ws.xn.ptr, ws.xq.ptr, ws.xs.ptr);
        if self.fp8_fusable(lin, h, FUSED_NORM_MAX_COLS) {
            self.ops()
                .add_rmsnorm_fp8(residual, delta, norm_w, xq, xs, n, h, eps)?;
            self.mark("add_rmsnorm fp8")?;
            self.linear_quantized(lin, n, out)
        } else {
            self.ops()
                .add_rmsnorm(residual, delta, norm_w, xn, n, h, eps)?;
            self.mark("add_rmsnorm")?;
            self.linear(lin, xn, n, out)
        }
    }

    /// SiLU(gate) * up of the `gate_up` rows, then `lin` (down_proj) of it, fused with the FP8
    /// quantization when `lin` takes it.
    pub(super) fn silu_linear(&mut self, lin: Lin, n: usize, out: u64) -> Result<()> {
        let inter = self.config.intermediate_size;
        let ws = &self.ws;
        let (gate_up, act, xq, xs) = (ws.gate_up.ptr, ws.act.ptr, ws.xq.ptr, ws.xs.ptr);
        if self.fp8_fusable(lin, inter, FUSED_SILU_MAX_COLS) {
            // act is unused on this path: it holds the split kernels' partial maxima.
            self.ops().silu_mul_fp8(xq, xs, gate_up, act, n, inter)?;
            self.mark("silu_mul fp8")?;
            self.linear_quantized(lin, n, out)
        } else {
            self.ops().silu_mul(act, gate_up, n, inter)?;
            self.mark("silu_mul")?;
            self.linear(lin, act, n, out)
        }
    }
}
