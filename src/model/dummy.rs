//! Dummy weights (`--load-format dummy`): seeded random tensors of the right shapes and dtypes.
//!
//! Scales are chosen so activations stay O(1) through any depth: linears have effective weights
//! N(0, 1/in); the two linears writing into the residual stream (o_proj, down_proj) are further
//! scaled by 1/sqrt(2·layers) so the residual's RMS stays near sqrt(2); norms are near 1.
//! [`tensor_specs`] describes every tensor with its distribution, so a GPU backend can generate
//! the same kind of weights on the device without building them on the host.

use super::config::LlamaConfig;
use super::weights::{assemble, layer_linears, Linear, LlamaWeights, TensorSource};
use anyhow::Result;
use candle_core::{DType, Tensor};
use float8::F8E4M3;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Standard deviation of the FP8 codes before rounding to e4m3 (max finite value is 448).
pub const FP8_CODE_STD: f32 = 32.0;

/// How a dummy tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DummyInit {
    /// N(mean, std²), rounded to the tensor's dtype.
    Normal { mean: f32, std: f32 },
    /// e4m3(clamp(N(0, FP8_CODE_STD²), ±448)): finite FP8 codes.
    Fp8Codes,
    /// Per-output-channel scale, `std / FP8_CODE_STD · U(0.9, 1.1)`, so the effective weight
    /// (code · scale) has standard deviation near `std`.
    Fp8Scale { std: f32 },
}

/// One tensor the model needs, as a backend would hold it after loading.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Checkpoint name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Dtype after loading: the config's dtype; F8E4M3 for FP8 weights; F32 for their scales.
    pub dtype: DType,
    pub init: DummyInit,
}

/// Every tensor of the model, in checkpoint order (no `lm_head.weight` when embeddings are tied).
pub fn tensor_specs(config: &LlamaConfig) -> Vec<TensorSpec> {
    let dense = config.torch_dtype.dtype();
    let h = config.hidden_size;
    let spec = |name: String, shape: Vec<usize>, dtype, init| TensorSpec {
        name,
        shape,
        dtype,
        init,
    };
    let norm = |name: String| {
        spec(
            name,
            vec![h],
            dense,
            DummyInit::Normal {
                mean: 1.0,
                std: 0.02,
            },
        )
    };
    let linear = |module: &str, out: usize, inp: usize, std: f32| {
        if config.is_fp8_linear(module) {
            vec![
                spec(
                    format!("{module}.weight"),
                    vec![out, inp],
                    DType::F8E4M3,
                    DummyInit::Fp8Codes,
                ),
                spec(
                    format!("{module}.weight_scale"),
                    vec![out, 1],
                    DType::F32,
                    DummyInit::Fp8Scale { std },
                ),
            ]
        } else {
            let init = DummyInit::Normal { mean: 0.0, std };
            vec![spec(
                format!("{module}.weight"),
                vec![out, inp],
                dense,
                init,
            )]
        }
    };
    let residual_damping = (2.0 * config.num_hidden_layers as f32).sqrt();
    let mut specs = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![config.vocab_size, h],
        dense,
        DummyInit::Normal {
            mean: 0.0,
            std: 1.0,
        },
    )];
    for layer in 0..config.num_hidden_layers {
        specs.push(norm(format!("model.layers.{layer}.input_layernorm.weight")));
        specs.push(norm(format!(
            "model.layers.{layer}.post_attention_layernorm.weight"
        )));
        for (module, out, inp) in layer_linears(config, layer) {
            let mut std = 1.0 / (inp as f32).sqrt();
            if module.ends_with("o_proj") || module.ends_with("down_proj") {
                std /= residual_damping;
            }
            specs.extend(linear(&module, out, inp, std));
        }
    }
    specs.push(norm("model.norm.weight".into()));
    if !config.tie_word_embeddings {
        specs.extend(linear(
            "lm_head",
            config.vocab_size,
            h,
            1.0 / (h as f32).sqrt(),
        ));
    }
    specs
}

/// Generates one tensor from its spec; the values depend only on `seed` and the tensor's name.
pub fn generate(spec: &TensorSpec, seed: u64) -> Result<Tensor> {
    let name_hash = xxhash_rust::xxh3::xxh3_64(spec.name.as_bytes());
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash);
    let n: usize = spec.shape.iter().product();
    let mut normal = |mean: f32, std: f32| -> Vec<f32> {
        (0..n)
            .map(|_| mean + std * rng.sample::<f32, _>(StandardNormal))
            .collect()
    };
    let t = match spec.init {
        DummyInit::Normal { mean, std } => Tensor::from_vec(
            normal(mean, std),
            spec.shape.as_slice(),
            &candle_core::Device::Cpu,
        )?,
        DummyInit::Fp8Codes => {
            let codes: Vec<F8E4M3> = normal(0.0, FP8_CODE_STD)
                .into_iter()
                .map(|x| F8E4M3::from_f32(x.clamp(-448.0, 448.0)))
                .collect();
            Tensor::from_vec(codes, spec.shape.as_slice(), &candle_core::Device::Cpu)?
        }
        DummyInit::Fp8Scale { std } => {
            let scales: Vec<f32> = (0..n)
                .map(|_| std / FP8_CODE_STD * rng.random_range(0.9..1.1))
                .collect();
            Tensor::from_vec(scales, spec.shape.as_slice(), &candle_core::Device::Cpu)?
        }
    };
    Ok(t.to_dtype(spec.dtype)?)
}

/// Dummy weights for `config`, deterministic per `seed`.
pub fn dummy_weights(config: &LlamaConfig, seed: u64) -> Result<LlamaWeights> {
    let specs = tensor_specs(config);
    let bytes: usize = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>() * s.dtype.size_in_bytes())
        .sum();
    if let Some(available) = host_memory_available() {
        // Generating goes through an F32 copy of the largest tensor, hence the margin.
        if bytes as u64 > available / 10 * 9 {
            anyhow::bail!(
                "dummy weights of this model need {:.1} GiB but only {:.1} GiB of host memory is available; \
                 a GPU backend generates them on the device",
                bytes as f64 / (1u64 << 30) as f64,
                available as f64 / (1u64 << 30) as f64
            );
        }
    }
    assemble(config, &mut DummySource { specs, seed })
}

struct DummySource {
    specs: Vec<TensorSpec>,
    seed: u64,
}

impl DummySource {
    fn get(&self, name: &str) -> Result<Tensor> {
        let spec = self.specs.iter().find(|s| s.name == name);
        let spec = spec.ok_or_else(|| anyhow::anyhow!("no dummy spec for tensor `{name}`"))?;
        generate(spec, self.seed)
    }
}

impl TensorSource for DummySource {
    fn dense(&mut self, name: &str, _shape: &[usize]) -> Result<Tensor> {
        self.get(name)
    }

    fn fp8(&mut self, module: &str, _out: usize, _inp: usize) -> Result<Linear> {
        Ok(Linear::Fp8 {
            weight: self.get(&format!("{module}.weight"))?,
            scale: self.get(&format!("{module}.weight_scale"))?,
        })
    }
}

/// `MemAvailable` of /proc/meminfo in bytes (None where there is no such file).
fn host_memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
