//! Host-side Llama weights: what a backend is built from.
//!
//! Tensors are candle CPU tensors, memory-mapped from safetensors where possible, kept in their
//! stored dtype (BF16/F16/F32, or F8E4M3 for compressed-tensors FP8 linears). Backends convert.

use super::config::LlamaConfig;
use anyhow::Result;
use candle_core::Tensor;

/// One linear layer `y = x · Wᵀ` with `W: [out, in]`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Unquantized weight in the checkpoint dtype.
    Dense { weight: Tensor },
    /// compressed-tensors FP8: `weight: [out, in]` F8E4M3, `scale: [out, 1]` F32 (per output
    /// channel; real weight = weight · scale). Activations are quantized per token at run time.
    Fp8 { weight: Tensor, scale: Tensor },
}

impl Linear {
    /// The stored weight `[out, in]` (FP8 codes for [`Linear::Fp8`]).
    pub fn weight(&self) -> &Tensor {
        match self {
            Linear::Dense { weight } | Linear::Fp8 { weight, .. } => weight,
        }
    }

    /// `[out, in]`
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight().dims();
        (d[0], d[1])
    }
}

#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub input_layernorm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Tensor,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct LlamaWeights {
    /// `[vocab, hidden]`
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    /// final RMSNorm weight `[hidden]`
    pub norm: Tensor,
    /// `[vocab, hidden]`; equal to `embed_tokens` (as a Dense linear) when embeddings are tied.
    pub lm_head: Linear,
}

/// The seven linears of decoder layer `layer`: (checkpoint module name, out, in), in the
/// order q, k, v, o, gate, up, down.
pub fn layer_linears(config: &LlamaConfig, layer: usize) -> [(String, usize, usize); 7] {
    let (h, i, q, kv) = (
        config.hidden_size,
        config.intermediate_size,
        config.q_size(),
        config.kv_size(),
    );
    let name = |m: &str| format!("model.layers.{layer}.{m}");
    [
        (name("self_attn.q_proj"), q, h),
        (name("self_attn.k_proj"), kv, h),
        (name("self_attn.v_proj"), kv, h),
        (name("self_attn.o_proj"), h, q),
        (name("mlp.gate_proj"), i, h),
        (name("mlp.up_proj"), i, h),
        (name("mlp.down_proj"), h, i),
    ]
}

/// Where [`assemble`] gets tensors from: a checkpoint or the dummy generator.
pub(crate) trait TensorSource {
    /// An unquantized tensor (embedding, norm, dense linear weight) of `shape`.
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// The FP8 linear `module` (`<module>.weight` and `<module>.weight_scale`).
    fn fp8(&mut self, module: &str, out: usize, inp: usize) -> Result<Linear>;
}

fn linear(
    config: &LlamaConfig,
    src: &mut impl TensorSource,
    (module, out, inp): &(String, usize, usize),
) -> Result<Linear> {
    if config.is_fp8_linear(module) {
        src.fp8(module, *out, *inp)
    } else {
        let weight = src.dense(&format!("{module}.weight"), &[*out, *inp])?;
        Ok(Linear::Dense { weight })
    }
}

/// Builds the weights tensor by tensor, in checkpoint order.
pub(crate) fn assemble(config: &LlamaConfig, src: &mut impl TensorSource) -> Result<LlamaWeights> {
    let (h, vocab) = (config.hidden_size, config.vocab_size);
    let embed_tokens = src.dense("model.embed_tokens.weight", &[vocab, h])?;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for layer in 0..config.num_hidden_layers {
        let norm = |src: &mut _, n: &str| {
            TensorSource::dense(src, &format!("model.layers.{layer}.{n}.weight"), &[h])
        };
        let input_layernorm = norm(src, "input_layernorm")?;
        let post_attention_layernorm = norm(src, "post_attention_layernorm")?;
        let mut l = layer_linears(config, layer)
            .iter()
            .map(|m| linear(config, src, m))
            .collect::<Result<Vec<_>>>()?
            .into_iter();
        let mut next = || l.next().expect("seven linears");
        layers.push(LayerWeights {
            input_layernorm,
            q_proj: next(),
            k_proj: next(),
            v_proj: next(),
            o_proj: next(),
            post_attention_layernorm,
            gate_proj: next(),
            up_proj: next(),
            down_proj: next(),
        });
    }
    let norm = src.dense("model.norm.weight", &[h])?;
    let lm_head = if config.tie_word_embeddings {
        Linear::Dense {
            weight: embed_tokens.clone(),
        }
    } else {
        linear(config, src, &("lm_head".to_string(), vocab, h))?
    };
    Ok(LlamaWeights {
        embed_tokens,
        layers,
        norm,
        lm_head,
    })
}
