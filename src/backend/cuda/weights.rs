//! Weights on the GPU: uploaded once from host [`LlamaWeights`], or generated on the device for
//! `--load-format dummy` (a 70B model never touches host memory). q/k/v and gate/up are fused
//! into one matrix each (one GEMM instead of three or two).

use super::device::{DeviceBuffer, Gpu};
use super::ops::{Ops, Precision};
use crate::model::config::LlamaConfig;
use crate::model::weights::{LayerWeights, Linear, LlamaWeights};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use half::bf16;

/// `y = x · Wᵀ` with `W: [n, k]` on the device.
pub enum GpuLinear {
    Bf16 {
        w: DeviceBuffer,
        n: usize,
        k: usize,
    },
    /// F32 weight (the reference-precision mode). `fp8_input`: a dequantized FP8 linear, whose
    /// input rows are rounded to their dynamic e4m3 values first.
    F32 {
        w: DeviceBuffer,
        n: usize,
        k: usize,
        fp8_input: bool,
    },
    /// e4m3 weight with one F32 scale per output channel.
    Fp8 {
        w: DeviceBuffer,
        scale: DeviceBuffer,
        n: usize,
        k: usize,
    },
}

impl GpuLinear {
    pub fn n(&self) -> usize {
        match self {
            GpuLinear::Bf16 { n, .. } | GpuLinear::F32 { n, .. } | GpuLinear::Fp8 { n, .. } => *n,
        }
    }
    pub fn k(&self) -> usize {
        match self {
            GpuLinear::Bf16 { k, .. } | GpuLinear::F32 { k, .. } | GpuLinear::Fp8 { k, .. } => *k,
        }
    }
    pub fn is_fp8(&self) -> bool {
        matches!(self, GpuLinear::Fp8 { .. })
    }
}

pub struct GpuLayer {
    pub input_norm: DeviceBuffer,
    /// `[q_size + 2 kv_size, hidden]`
    pub qkv: GpuLinear,
    pub o: GpuLinear,
    pub post_norm: DeviceBuffer,
    /// `[2 intermediate, hidden]`: gate rows then up rows.
    pub gate_up: GpuLinear,
    pub down: GpuLinear,
}

pub struct GpuWeights {
    /// `[vocab, hidden]` BF16
    pub embed: DeviceBuffer,
    pub layers: Vec<GpuLayer>,
    pub norm: DeviceBuffer,
    /// `[vocab, hidden]`, BF16 or F32 (an FP8 lm_head is dequantized at upload).
    pub lm_head: GpuLinear,
    /// `[head_dim / 2]` F32, llama3 scaling applied.
    pub inv_freq: DeviceBuffer,
}

fn bf16_vec(t: &Tensor) -> Result<Vec<bf16>> {
    Ok(t.to_dtype(DType::BF16)?.flatten_all()?.to_vec1::<bf16>()?)
}

fn upload_bf16(gpu: &Gpu, t: &Tensor) -> Result<DeviceBuffer> {
    gpu.upload(&bf16_vec(t)?)
}

/// A dense `[n, k]` weight in the activation precision.
fn upload_dense(gpu: &Gpu, t: &Tensor, precision: Precision) -> Result<GpuLinear> {
    let (n, k) = t.dims2()?;
    Ok(match precision {
        Precision::Bf16 => GpuLinear::Bf16 {
            w: upload_bf16(gpu, t)?,
            n,
            k,
        },
        Precision::F32 => {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            GpuLinear::F32 {
                w: gpu.upload(&v)?,
                n,
                k,
                fp8_input: false,
            }
        }
    })
}

/// Concatenates linears along the output dimension and uploads them.
fn upload_fused(
    gpu: &Gpu,
    parts: &[&Linear],
    what: &str,
    precision: Precision,
) -> Result<GpuLinear> {
    let k = parts[0].dims().1;
    let n: usize = parts.iter().map(|p| p.dims().0).sum();
    if parts.iter().any(|p| p.dims().1 != k) {
        bail!("{what}: fused linears have different input sizes");
    }
    let all_fp8 = parts.iter().all(|p| matches!(p, Linear::Fp8 { .. }));
    let all_dense = parts.iter().all(|p| matches!(p, Linear::Dense { .. }));
    if all_dense {
        let ws: Vec<Tensor> = parts
            .iter()
            .map(|p| match p {
                Linear::Dense { weight } => weight.clone(),
                Linear::Fp8 { .. } => unreachable!(),
            })
            .collect();
        return upload_dense(gpu, &Tensor::cat(&ws, 0)?, precision);
    }
    if !all_fp8 {
        bail!("{what}: mixing FP8 and unquantized linears in one fused matrix is not supported");
    }
    if precision == Precision::F32 {
        let ws = parts
            .iter()
            .map(|p| dequantized(p))
            .collect::<Result<Vec<_>>>()?;
        let v = Tensor::cat(&ws, 0)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        return Ok(GpuLinear::F32 {
            w: gpu.upload(&v)?,
            n,
            k,
            fp8_input: true,
        });
    }
    let (mut bytes, mut scales) = (Vec::with_capacity(n * k), Vec::with_capacity(n));
    for p in parts {
        if let Linear::Fp8 { weight, scale } = p {
            let w = weight.flatten_all()?.to_vec1::<float8::F8E4M3>()?;
            bytes.extend(w.iter().map(|x| x.to_bits()));
            scales.extend(
                scale
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
    }
    if scales.len() != n {
        bail!(
            "{what}: expected {n} weight scales (one per output channel), got {}",
            scales.len()
        );
    }
    Ok(GpuLinear::Fp8 {
        w: gpu.upload(&bytes)?,
        scale: gpu.upload(&scales)?,
        n,
        k,
    })
}

fn dequantized(l: &Linear) -> Result<Tensor> {
    Ok(match l {
        Linear::Dense { weight } => weight.clone(),
        Linear::Fp8 { weight, scale } => weight
            .to_dtype(DType::F32)?
            .broadcast_mul(&scale.to_dtype(DType::F32)?)?,
    })
}

fn upload_layer(gpu: &Gpu, l: &LayerWeights, i: usize, p: Precision) -> Result<GpuLayer> {
    let fused =
        |parts: &[&Linear], what: &str| upload_fused(gpu, parts, &format!("layer {i} {what}"), p);
    Ok(GpuLayer {
        input_norm: upload_bf16(gpu, &l.input_layernorm)?,
        qkv: fused(&[&l.q_proj, &l.k_proj, &l.v_proj], "qkv")?,
        o: fused(&[&l.o_proj], "o_proj")?,
        post_norm: upload_bf16(gpu, &l.post_attention_layernorm)?,
        gate_up: fused(&[&l.gate_proj, &l.up_proj], "gate_up")?,
        down: fused(&[&l.down_proj], "down_proj")?,
    })
}

fn inv_freq(gpu: &Gpu, config: &LlamaConfig) -> Result<DeviceBuffer> {
    let f: Vec<f32> = config.rope_inv_freq().iter().map(|&x| x as f32).collect();
    gpu.upload(&f)
}

impl GpuWeights {
    /// Norm and embedding weights stay BF16 (exact for BF16 checkpoints); dense linears take the
    /// activation precision.
    pub fn upload(
        gpu: &Gpu,
        config: &LlamaConfig,
        w: &LlamaWeights,
        precision: Precision,
    ) -> Result<Self> {
        if w.layers.len() != config.num_hidden_layers {
            bail!(
                "weights have {} layers, config.json says {}",
                w.layers.len(),
                config.num_hidden_layers
            );
        }
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                upload_layer(gpu, l, i, precision).with_context(|| format!("uploading layer {i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed: upload_bf16(gpu, &w.embed_tokens)?,
            layers,
            norm: upload_bf16(gpu, &w.norm)?,
            lm_head: upload_dense(gpu, &dequantized(&w.lm_head)?, precision)?,
            inv_freq: inv_freq(gpu, config)?,
        })
    }

    /// Seeded random weights of the config's shapes, generated on the GPU: BF16 uniform in
    /// ±sqrt(3/k) (unit-variance outputs), e4m3 weights spread over the whole FP8 range with
    /// positive per-channel scales of the matching size, norms near 1. `config` may be one
    /// tensor-parallel rank's (see `shard.rs`).
    pub fn dummy(gpu: &Gpu, ops: &Ops, config: &LlamaConfig, seed: u64) -> Result<Self> {
        let mut counter = seed.wrapping_mul(1_000_003);
        let mut next_seed = || {
            counter = counter.wrapping_add(1);
            counter
        };
        let h = config.hidden_size;
        let embed = gpu.alloc(config.vocab_size * h * 2)?;
        ops.fill_bf16(embed.ptr, config.vocab_size * h, next_seed(), -1.0, 1.0)?;
        let mut bf16_buf = |n: usize, lo: f32, hi: f32| -> Result<DeviceBuffer> {
            let b = gpu.alloc(n * 2)?;
            ops.fill_bf16(b.ptr, n, next_seed(), lo, hi)?;
            Ok(b)
        };
        let norm = bf16_buf(h, 0.8, 1.2)?;
        let a = (3.0 / h as f32).sqrt();
        let lm_head = GpuLinear::Bf16 {
            w: bf16_buf(config.vocab_size * h, -a, a)?,
            n: config.vocab_size,
            k: h,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        let qkv_n = config.q_size() + 2 * config.kv_size();
        let inter = config.intermediate_size;
        let mut seeds = (0..config.num_hidden_layers * 8)
            .map(|i| seed.wrapping_mul(7919).wrapping_add(i as u64 + 17));
        for i in 0..config.num_hidden_layers {
            let mut lin = |name: &str, n: usize, k: usize| -> Result<GpuLinear> {
                let fp8 = config.is_fp8_linear(&format!("model.layers.{i}.{name}"));
                let s = seeds.next().unwrap();
                if fp8 {
                    let w = gpu.alloc(n * k)?;
                    ops.fill_fp8(w.ptr, n * k, s, -448.0, 448.0)?;
                    // e4m3 uniform on ±448 has standard deviation ~258.
                    let c = 1.0 / (258.0 * (k as f32).sqrt());
                    let scale = gpu.alloc(n * 4)?;
                    ops.fill_f32(scale.ptr, n, s ^ 0x5555, 0.5 * c, 1.5 * c)?;
                    Ok(GpuLinear::Fp8 { w, scale, n, k })
                } else {
                    let w = gpu.alloc(n * k * 2)?;
                    let a = (3.0 / k as f32).sqrt();
                    ops.fill_bf16(w.ptr, n * k, s, -a, a)?;
                    Ok(GpuLinear::Bf16 { w, n, k })
                }
            };
            let qkv = lin("self_attn.q_proj", qkv_n, h)?;
            let o = lin("self_attn.o_proj", h, config.q_size())?;
            let gate_up = lin("mlp.gate_proj", 2 * inter, h)?;
            let down = lin("mlp.down_proj", h, inter)?;
            let input_norm = gpu.alloc(h * 2)?;
            ops.fill_bf16(input_norm.ptr, h, seeds.next().unwrap(), 0.8, 1.2)?;
            let post_norm = gpu.alloc(h * 2)?;
            ops.fill_bf16(post_norm.ptr, h, seeds.next().unwrap(), 0.8, 1.2)?;
            layers.push(GpuLayer {
                input_norm,
                qkv,
                o,
                post_norm,
                gate_up,
                down,
            });
        }
        gpu.sync()?;
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            inv_freq: inv_freq(gpu, config)?,
        })
    }

    pub fn bytes(&self) -> usize {
        let lin = |l: &GpuLinear| match l {
            GpuLinear::Bf16 { w, .. } | GpuLinear::F32 { w, .. } => w.bytes,
            GpuLinear::Fp8 { w, scale, .. } => w.bytes + scale.bytes,
        };
        self.embed.bytes
            + self.norm.bytes
            + lin(&self.lm_head)
            + self
                .layers
                .iter()
                .map(|l| {
                    l.input_norm.bytes
                        + l.post_norm.bytes
                        + lin(&l.qkv)
                        + lin(&l.o)
                        + lin(&l.gate_up)
                        + lin(&l.down)
                })
                .sum::<usize>()
    }
}
