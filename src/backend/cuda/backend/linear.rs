//! The linears of a layer (qkv, o, gate_up, down) in each precision: FP8 with dynamic per-token
//! input scales (optionally over the whole row of all tensor-parallel ranks), BF16, F32.

use super::super::ops::{
    Ops, Precision, FUSED_NORM_MAX_COLS, FUSED_SILU_MAX_COLS, SILU_SPLIT_BELOW_ROWS,
};
use super::super::weights::{GpuLinear, GpuWeights};
use super::CudaBackend;
use anyhow::{bail, ensure, Result};

/// A linear's output as the next kernel reads it: in memory (a residual delta of 0: none), or
/// still the F32 accumulator of an unscaled FP8 product (decode batch sizes) whose epilogue that
/// kernel applies itself, one launch fewer per linear: rope_kv_write after qkv
/// (`rope_kv_write_from`), the norm after o_proj and down_proj (`add_rmsnorm_fp8_acc`), the silu
/// after gate_up (`silu_mul_fp8_acc`). The token scales are in `ws.xs`. Under tensor parallelism
/// a row-parallel output (o_proj, down_proj) is this rank's part (`RankPartial`), which the norm
/// reading it sums over the ranks (`add_rmsnorm_fp8_peer`, or an all-reduce first).
#[derive(Clone, Copy)]
pub(super) enum LinOut {
    Scaled(u64),
    Unscaled { acc: u64, w_scale: u64 },
    RankPartial(u64),
}

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
        self.linear_into(lin, x, m, out, false).map(|_| ())
    }

    /// `lin` of the rows `x` (quantized first for an FP8 linear); `fold`: see
    /// [`Self::linear_quantized_into`].
    pub(super) fn linear_into(
        &mut self,
        lin: Lin,
        x: u64,
        m: usize,
        out: u64,
        fold: bool,
    ) -> Result<LinOut> {
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
                return self.linear_quantized_into(lin, m, out, fold);
            }
        }
        self.mark(label)?;
        Ok(LinOut::Scaled(out))
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

    /// May the qkv product stay unscaled for rope_kv_write (`rope_kv_write_from`)? (Column
    /// parallel under TP: each rank scales its own heads.)
    pub(super) fn folds_into_rope(&self) -> bool {
        self.fold_epilogues && self.opts.precision == Precision::Bf16
    }

    /// May a linear's output stay unscaled for the fused FP8 norm before `consumer` (o_proj and
    /// down_proj outputs), or for the fused silu before it (`consumer` = down_proj: the gate_up
    /// output of `rows` rows)? BF16 only; under tensor parallelism only the silu (o_proj's and
    /// down_proj's outputs are summed over the ranks, scaled, before the norm).
    /// `TANDEM_FOLD_EPILOGUE=0` turns it off (comparisons).
    pub(super) fn folds_epilogue(&self, consumer: Lin, rows: usize) -> bool {
        let fusable = match consumer {
            Lin::Down(_) => {
                rows < SILU_SPLIT_BELOW_ROWS
                    && self.fp8_fusable(
                        consumer,
                        self.config.intermediate_size,
                        FUSED_SILU_MAX_COLS,
                    )
            }
            _ => self.fp8_fusable(consumer, self.config.hidden_size, FUSED_NORM_MAX_COLS),
        };
        self.fold_epilogues
            && (self.tp.is_none() || matches!(consumer, Lin::Down(_)))
            && self.opts.precision == Precision::Bf16
            && fusable
    }

    /// The FP8 linear `lin` of the input already quantized in `ws.xq` / `ws.xs`, into `out`; with
    /// `fold`, an unscaled product is left unscaled for the next kernel (`LinOut::Unscaled`).
    pub(super) fn linear_quantized_into(
        &mut self,
        lin: Lin,
        m: usize,
        out: u64,
        fold: bool,
    ) -> Result<LinOut> {
        let stream = self.gpu.cu_stream();
        let (xq, xs) = (self.ws.xq.ptr, self.ws.xs.ptr);
        let f32_out = self.opts.precision == Precision::F32;
        let (l, label) = weight(&self.weights, lin);
        let GpuLinear::Fp8 { w, scale, n, k } = l else {
            bail!("a quantized input for a linear that is not FP8");
        };
        if fold {
            if let Some(acc) = self
                .gemm
                .fp8_unscaled_product(m, *n, *k, xq, w.ptr, stream)?
            {
                let w_scale = scale.ptr;
                self.mark(label)?;
                return Ok(LinOut::Unscaled { acc, w_scale });
            }
        }
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
        self.mark(label)?;
        Ok(LinOut::Scaled(out))
    }

    /// Adds `delta` to the residual stream, RMS-normalizes it with `norm_w` and runs `lin` on the
    /// result: for an FP8 linear the norm writes the quantized input directly. `fold`: see
    /// [`Self::linear_quantized_into`].
    pub(super) fn norm_linear(
        &mut self,
        lin: Lin,
        delta: LinOut,
        norm_w: u64,
        n: usize,
        out: u64,
        fold: bool,
    ) -> Result<LinOut> {
        let (h, eps) = (self.config.hidden_size, self.config.rms_norm_eps as f32);
        let ws = &self.ws;
        let (residual, xn, xq, xs) = (ws.residual.ptr, ws.xn.ptr, ws.xq.ptr, ws.xs.ptr);
        let delta = match delta {
            LinOut::Scaled(d) => d,
            LinOut::RankPartial(d) => {
                let fusable = self.opts.precision == Precision::Bf16
                    && self.fp8_fusable(lin, h, FUSED_NORM_MAX_COLS);
                let peer = self.tp.as_ref().filter(|_| fusable);
                match peer.and_then(|tp| tp.norm_call(n, h)) {
                    Some(peer) => {
                        self.ops()
                            .add_rmsnorm_fp8_peer(residual, d, norm_w, xq, xs, n, h, eps, peer)?;
                        self.mark("all_reduce + add_rmsnorm fp8")?;
                        return self.linear_quantized_into(lin, n, out, fold);
                    }
                    None => {
                        self.tp_all_reduce(d, n * h, self.opts.precision)?;
                        d
                    }
                }
            }
            LinOut::Unscaled { acc, w_scale } => {
                ensure!(
                    self.folds_epilogue(lin, n),
                    "an unscaled delta for a norm that cannot fold it"
                );
                self.ops()
                    .add_rmsnorm_fp8_acc(residual, acc, w_scale, norm_w, xq, xs, n, h, eps)?;
                self.mark("add_rmsnorm fp8")?;
                return self.linear_quantized_into(lin, n, out, fold);
            }
        };
        if self.fp8_fusable(lin, h, FUSED_NORM_MAX_COLS) {
            self.ops()
                .add_rmsnorm_fp8(residual, delta, norm_w, xq, xs, n, h, eps)?;
            self.mark("add_rmsnorm fp8")?;
            self.linear_quantized_into(lin, n, out, fold)
        } else {
            self.ops()
                .add_rmsnorm(residual, delta, norm_w, xn, n, h, eps)?;
            self.mark("add_rmsnorm")?;
            self.linear_into(lin, xn, n, out, fold)
        }
    }

    /// SiLU(gate) * up of the `gate_up` rows, then `lin` (down_proj) of it, fused with the FP8
    /// quantization when `lin` takes it; `fold`: see [`Self::linear_quantized_into`].
    pub(super) fn silu_linear(
        &mut self,
        lin: Lin,
        gate_up: LinOut,
        n: usize,
        out: u64,
        fold: bool,
    ) -> Result<LinOut> {
        let inter = self.config.intermediate_size;
        let ws = &self.ws;
        let (act, xq, xs) = (ws.act.ptr, ws.xq.ptr, ws.xs.ptr);
        let gate_up = match gate_up {
            LinOut::Scaled(g) => g,
            LinOut::RankPartial(_) => bail!("silu of a rank's partial sum"),
            LinOut::Unscaled { acc, w_scale } => {
                ensure!(
                    self.folds_epilogue(lin, n),
                    "an unscaled gate_up for a silu that cannot fold it"
                );
                self.ops()
                    .silu_mul_fp8_acc(xq, xs, acc, w_scale, act, n, inter)?;
                self.mark("silu_mul fp8")?;
                return self.linear_quantized_into(lin, n, out, fold);
            }
        };
        if self.fp8_fusable(lin, inter, FUSED_SILU_MAX_COLS) {
            // act is unused on this path: it holds the split kernels' partial maxima.
            self.ops().silu_mul_fp8(xq, xs, gate_up, act, n, inter)?;
            self.mark("silu_mul fp8")?;
            self.linear_quantized_into(lin, n, out, fold)
        } else {
            self.ops().silu_mul(act, gate_up, n, inter)?;
            self.mark("silu_mul")?;
            self.linear(lin, act, n, out)?;
            Ok(LinOut::Scaled(out))
        }
    }
}
