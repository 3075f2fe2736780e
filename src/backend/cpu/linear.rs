//! Linear layers in f32, including the exact function of the GPU's FP8 path.

use crate::model::weights::Linear;
use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use float8::F8E4M3;

/// Largest finite e4m3 value.
pub const FP8_MAX: f32 = 448.0;
/// Smallest per-token activation scale (vLLM's choice), so an all-zero row divides by something.
pub const FP8_MIN_SCALE: f32 = 1.0 / (FP8_MAX * 512.0);

pub enum CpuLinear {
    /// `y = x · W`, with `weight_t = Wᵀ: [in, out]` (transposed once, contiguous, for the matmul).
    Dense { weight_t: Tensor },
    /// `y = (q(x) · W_qᵀ) · scale_x · scale_w`: `weight_t` holds the e4m3 values decoded exactly
    /// to f32, `scale: [1, out]`; `q(x)` quantizes each row of `x` to e4m3 with its own scale.
    Fp8 { weight_t: Tensor, scale: Tensor },
}

impl CpuLinear {
    pub fn new(linear: &Linear) -> Result<Self> {
        Ok(match linear {
            Linear::Dense { weight } => Self::Dense {
                weight_t: transposed_f32(weight)?,
            },
            Linear::Fp8 { weight, scale } => {
                ensure!(
                    weight.dtype() == DType::F8E4M3,
                    "FP8 linear weight must be F8E4M3, got {:?}",
                    weight.dtype()
                );
                let out = weight.dim(0)?;
                ensure!(
                    scale.elem_count() == out,
                    "FP8 weight scale has {} values for {out} output channels",
                    scale.elem_count()
                );
                Self::Fp8 {
                    weight_t: transposed_f32(weight)?,
                    scale: scale.to_dtype(DType::F32)?.reshape((1, out))?,
                }
            }
        })
    }

    /// `[in, out]`
    pub fn dims(&self) -> (usize, usize) {
        let (Self::Dense { weight_t } | Self::Fp8 { weight_t, .. }) = self;
        let d = weight_t.dims();
        (d[0], d[1])
    }

    /// `x: [n, in]` f32 -> `[n, out]` f32
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense { weight_t } => Ok(x.matmul(weight_t)?),
            Self::Fp8 { weight_t, scale } => {
                let (xq, x_scale) = quantize_per_token(x)?;
                Ok(xq
                    .matmul(weight_t)?
                    .broadcast_mul(&x_scale)?
                    .broadcast_mul(scale)?)
            }
        }
    }
}

fn transposed_f32(weight: &Tensor) -> Result<Tensor> {
    Ok(weight.to_dtype(DType::F32)?.t()?.contiguous()?)
}

/// Per-row dynamic FP8 quantization of `x: [n, d]`: `scale = max(amax / 448, FP8_MIN_SCALE)`,
/// values `x / scale` rounded to the nearest e4m3 (ties to even, saturating at ±448) and decoded
/// back to f32. Returns the decoded values `[n, d]` and the scales `[n, 1]`.
pub fn quantize_per_token(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, d) = x.dims2()?;
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    let mut scales = Vec::with_capacity(n);
    for row in values.chunks_mut(d.max(1)) {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = (amax / FP8_MAX).max(FP8_MIN_SCALE);
        for v in row.iter_mut() {
            *v = F8E4M3::from_f32(*v / scale).to_f32();
        }
        scales.push(scale);
    }
    let device = x.device();
    Ok((
        Tensor::from_vec(values, (n, d), device)?,
        Tensor::from_vec(scales, (n, 1), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quantization_rounds_to_e4m3_grid() {
        // amax 448 -> scale 1: values land on the e4m3 grid (spacing 2 in [16, 32), 32 in [256, 448]).
        let x = Tensor::new(&[[448.0f32, 17.0, -300.0, 0.0]], &Device::Cpu).unwrap();
        let (q, s) = quantize_per_token(&x).unwrap();
        assert_eq!(s.to_vec2::<f32>().unwrap(), vec![vec![1.0]]);
        assert_eq!(
            q.to_vec2::<f32>().unwrap(),
            vec![vec![448.0, 16.0, -288.0, 0.0]]
        );
        // A zero row keeps a positive scale and zero values.
        let z = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
        let (q, s) = quantize_per_token(&z).unwrap();
        assert_eq!(s.to_vec2::<f32>().unwrap()[0][0], FP8_MIN_SCALE);
        assert_eq!(q.to_vec2::<f32>().unwrap(), vec![vec![0.0; 3]]);
    }

    #[test]
    fn fp8_linear_matches_naive_dequantized_product() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1.0f32, -2.0, 0.5], [0.25, 3.0, -1.5]], &dev).unwrap();
        let linear = Linear::Fp8 {
            weight: w.to_dtype(DType::F8E4M3).unwrap(),
            scale: Tensor::new(&[[0.5f32], [2.0]], &dev).unwrap(),
        };
        let cpu = CpuLinear::new(&linear).unwrap();
        assert_eq!(cpu.dims(), (3, 2));
        // Row amax 112 -> scale 0.25; 112 -> 448, 25 -> 100 -> 96 (tie to even), -50 -> -200 -> -192.
        let x = Tensor::new(&[[112.0f32, 25.0, -50.0]], &dev).unwrap();
        let y = cpu.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let xq = [448.0f32, 96.0, -192.0];
        let sx = 0.25f32;
        let want0 = (xq[0] * 1.0 + xq[1] * -2.0 + xq[2] * 0.5) * sx * 0.5;
        let want1 = (xq[0] * 0.25 + xq[1] * 3.0 + xq[2] * -1.5) * sx * 2.0;
        assert!((y[0][0] - want0).abs() < 1e-4, "{} vs {want0}", y[0][0]);
        assert!((y[0][1] - want1).abs() < 1e-4, "{} vs {want1}", y[0][1]);
    }
}
