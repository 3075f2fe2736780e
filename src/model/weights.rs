//! Host-side Llama weights: what a backend is built from.
//!
//! Tensors are candle CPU tensors, memory-mapped from safetensors where possible, kept in their
//! stored dtype (BF16/F16/F32, or F8E4M3 for compressed-tensors FP8 linears). Backends convert.

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
    /// `[out, in]`
    pub fn dims(&self) -> (usize, usize) {
        let w = match self {
            Linear::Dense { weight } | Linear::Fp8 { weight, .. } => weight,
        };
        let d = w.dims();
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
