//! A Hugging Face `config.json` for `LlamaForCausalLM`, validated once so later code never re-checks.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Llama 3 "llama3" rope scaling (frequency-dependent interpolation).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// compressed-tensors `float-quantized`: FP8 e4m3 weights with per-output-channel scales and
/// dynamic per-token FP8 activations. Modules named in `ignore` (lm_head) stay unquantized.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Quantization {
    pub ignore: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// dtype of the unquantized tensors (norms, embeddings, lm_head, and every linear when not FP8).
    pub torch_dtype: WeightDtype,
    pub quantization: Option<Fp8Quantization>,
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value> {
    v.get(name)
        .with_context(|| format!("config.json: missing field `{name}`"))
}

fn usize_field(v: &Value, name: &str) -> Result<usize> {
    let f = field(v, name)?;
    match f.as_u64() {
        Some(n) if n > 0 => Ok(n as usize),
        _ => bail!("config.json: field `{name}` must be a positive integer, got {f}"),
    }
}

fn f64_field(v: &Value, name: &str) -> Result<f64> {
    let f = field(v, name)?;
    f.as_f64()
        .with_context(|| format!("config.json: field `{name}` must be a number, got {f}"))
}

fn token_ids(v: Option<&Value>, name: &str) -> Result<Vec<u32>> {
    let bad = || format!("config.json: field `{name}` must be a token id or a list of them");
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) => Ok(vec![n.as_u64().with_context(bad)? as u32]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|n| n as u32).with_context(bad))
            .collect(),
        Some(_) => bail!(bad()),
    }
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        Self::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let arch_ok = match v.get("architectures") {
            None => v.get("model_type").and_then(Value::as_str) == Some("llama"),
            Some(a) => a
                .as_array()
                .map(|a| a.iter().any(|x| x.as_str() == Some("LlamaForCausalLM")))
                .unwrap_or(false),
        };
        if !arch_ok {
            bail!(
                "config.json: field `architectures` must contain \"LlamaForCausalLM\", got {}",
                v.get("architectures").unwrap_or(&Value::Null)
            );
        }
        let hidden_size = usize_field(v, "hidden_size")?;
        let num_attention_heads = usize_field(v, "num_attention_heads")?;
        let num_key_value_heads = match v.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => usize_field(v, "num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_attention_heads != 0 {
                    bail!("config.json: field `hidden_size` ({hidden_size}) is not divisible by `num_attention_heads` ({num_attention_heads})");
                }
                hidden_size / num_attention_heads
            }
            Some(_) => usize_field(v, "head_dim")?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            bail!("config.json: field `num_key_value_heads` ({num_key_value_heads}) must divide `num_attention_heads` ({num_attention_heads})");
        }
        if head_dim % 2 != 0 {
            bail!(
                "config.json: field `head_dim` must be even for rotary embeddings, got {head_dim}"
            );
        }
        if let Some(act) = v.get("hidden_act") {
            if act.as_str() != Some("silu") {
                bail!("config.json: field `hidden_act` must be \"silu\", got {act}");
            }
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if v.get(flag).and_then(Value::as_bool) == Some(true) {
                bail!("config.json: field `{flag}` = true is not supported");
            }
        }
        // transformers >= 5 writes `rope_parameters` (with `rope_theta` inside) instead.
        let rope_parameters = v.get("rope_parameters").filter(|p| !p.is_null());
        let rope_scaling = parse_rope_scaling(
            v.get("rope_scaling")
                .filter(|p| !p.is_null())
                .or(rope_parameters),
        )?;
        let torch_dtype = match v.get("torch_dtype").or_else(|| v.get("dtype")) {
            None | Some(Value::Null) => WeightDtype::F32,
            Some(d) => match d.as_str() {
                Some("float32") => WeightDtype::F32,
                Some("float16") => WeightDtype::F16,
                Some("bfloat16") => WeightDtype::Bf16,
                _ => bail!("config.json: field `torch_dtype` must be float32, float16 or bfloat16, got {d}"),
            },
        };
        let quantization = match v.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(q) => Some(parse_quantization(q)?),
        };
        let eos_token_ids = token_ids(v.get("eos_token_id"), "eos_token_id")?;
        let bos = token_ids(v.get("bos_token_id"), "bos_token_id")?;
        Ok(Self {
            hidden_size,
            intermediate_size: usize_field(v, "intermediate_size")?,
            num_hidden_layers: usize_field(v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: usize_field(v, "vocab_size")?,
            rms_norm_eps: match v.get("rms_norm_eps") {
                None => 1e-6,
                Some(_) => f64_field(v, "rms_norm_eps")?,
            },
            rope_theta: match (v.get("rope_theta"), rope_parameters) {
                (Some(_), _) => f64_field(v, "rope_theta")?,
                (None, Some(p)) if p.get("rope_theta").is_some() => {
                    f64_field(p, "rope_theta").context("in `rope_parameters`")?
                }
                (None, _) => 10_000.0,
            },
            rope_scaling,
            max_position_embeddings: match v.get("max_position_embeddings") {
                None => 4096,
                Some(_) => usize_field(v, "max_position_embeddings")?,
            },
            tie_word_embeddings: match v.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(b) => b.as_bool().with_context(|| {
                    format!("config.json: field `tie_word_embeddings` must be a boolean, got {b}")
                })?,
            },
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            torch_dtype,
            quantization,
        })
    }

    /// Is the linear called `module` (e.g. "model.layers.0.self_attn.q_proj" or "lm_head") FP8?
    pub fn is_fp8_linear(&self, module: &str) -> bool {
        match &self.quantization {
            None => false,
            Some(q) => !q
                .ignore
                .iter()
                .any(|pattern| ignore_matches(pattern, module)),
        }
    }

    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Inverse rotary frequencies per pair of dimensions, with llama3 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let freq = 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64);
                match &self.rope_scaling {
                    None => freq,
                    Some(s) => llama3_scale(freq, s),
                }
            })
            .collect()
    }
}

/// compressed-tensors names ignored modules exactly, or with a `re:` regex prefix.
fn ignore_matches(pattern: &str, module: &str) -> bool {
    match pattern.strip_prefix("re:") {
        // Patterns seen in practice are suffix matches like `re:.*lm_head`.
        Some(re) => {
            let tail = re.trim_start_matches(".*").trim_end_matches('$');
            module.ends_with(tail)
        }
        None => pattern == module,
    }
}

fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old_len = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_len / s.low_freq_factor;
    let high_freq_wavelen = old_len / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_freq_wavelen {
        freq
    } else if wavelen > low_freq_wavelen {
        freq / s.factor
    } else {
        let smooth =
            (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<Option<Llama3RopeScaling>> {
    let v = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .context("config.json: field `rope_scaling.rope_type` is missing")?;
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let num = |name: &str| -> Result<f64> {
                v.get(name).and_then(Value::as_f64).with_context(|| {
                    format!("config.json: field `rope_scaling.{name}` must be a number")
                })
            };
            let s = Llama3RopeScaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            };
            if s.factor <= 0.0 || s.low_freq_factor <= 0.0 || s.original_max_position_embeddings == 0 {
                bail!("config.json: fields `rope_scaling.factor`, `low_freq_factor` and `original_max_position_embeddings` must be positive");
            }
            if s.high_freq_factor <= s.low_freq_factor {
                bail!("config.json: field `rope_scaling.high_freq_factor` must exceed `low_freq_factor`");
            }
            Ok(Some(s))
        }
        other => bail!("config.json: field `rope_scaling.rope_type` = {other:?} is not supported (only \"llama3\")"),
    }
}

fn parse_quantization(q: &Value) -> Result<Fp8Quantization> {
    let method = q.get("quant_method").and_then(Value::as_str);
    if method != Some("compressed-tensors") {
        bail!(
            "config.json: field `quantization_config.quant_method` must be \"compressed-tensors\", got {}",
            q.get("quant_method").unwrap_or(&Value::Null)
        );
    }
    let format = q.get("format").and_then(Value::as_str);
    if format != Some("float-quantized") {
        bail!(
            "config.json: field `quantization_config.format` must be \"float-quantized\", got {}",
            q.get("format").unwrap_or(&Value::Null)
        );
    }
    let groups = q
        .get("config_groups")
        .and_then(Value::as_object)
        .context("config.json: field `quantization_config.config_groups` is missing")?;
    if groups.is_empty() {
        bail!("config.json: field `quantization_config.config_groups` is empty");
    }
    for (name, group) in groups {
        let targets = group.get("targets").unwrap_or(&Value::Null);
        if targets != &serde_json::json!(["Linear"]) {
            bail!("config.json: field `quantization_config.config_groups.{name}.targets` must be [\"Linear\"], got {targets}");
        }
        let w = group.get("weights").with_context(|| {
            format!(
                "config.json: field `quantization_config.config_groups.{name}.weights` is missing"
            )
        })?;
        expect(w, name, "weights", "num_bits", &Value::from(8))?;
        expect(w, name, "weights", "type", &Value::from("float"))?;
        expect(w, name, "weights", "strategy", &Value::from("channel"))?;
        expect(w, name, "weights", "dynamic", &Value::from(false))?;
        let a = group.get("input_activations").with_context(|| {
            format!("config.json: field `quantization_config.config_groups.{name}.input_activations` is missing")
        })?;
        expect(a, name, "input_activations", "num_bits", &Value::from(8))?;
        expect(a, name, "input_activations", "type", &Value::from("float"))?;
        expect(
            a,
            name,
            "input_activations",
            "strategy",
            &Value::from("token"),
        )?;
        expect(a, name, "input_activations", "dynamic", &Value::from(true))?;
    }
    if let Some(kv) = q.get("kv_cache_scheme").filter(|v| !v.is_null()) {
        bail!("config.json: field `quantization_config.kv_cache_scheme` is not supported (KV cache quantization), got {kv}");
    }
    let ignore = match q.get("ignore") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_owned).context(
                    "config.json: field `quantization_config.ignore` must be a list of strings",
                )
            })
            .collect::<Result<_>>()?,
        Some(_) => {
            bail!("config.json: field `quantization_config.ignore` must be a list of strings")
        }
    };
    Ok(Fp8Quantization { ignore })
}

fn expect(obj: &Value, group: &str, part: &str, key: &str, want: &Value) -> Result<()> {
    let got = obj.get(key).unwrap_or(&Value::Null);
    if got != want {
        bail!("config.json: field `quantization_config.config_groups.{group}.{part}.{key}` must be {want}, got {got} (only FP8 per-channel weights with dynamic per-token activations are supported)");
    }
    Ok(())
}

impl WeightDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            WeightDtype::F32 => candle_core::DType::F32,
            WeightDtype::F16 => candle_core::DType::F16,
            WeightDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}
