//! The Llama forward pass in f32 over a batch of sequence chunks: linears run on all rows of the
//! batch at once, attention per sequence over its paged KV cache.

use super::attention::{causal_attention, Rope};
use super::kv_cache::PagedKvCache;
use super::linear::CpuLinear;
use crate::backend::{Emit, SeqChunk};
use crate::model::config::LlamaConfig;
use crate::model::weights::{LayerWeights, LlamaWeights};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};

struct CpuLayer {
    input_layernorm: Tensor,
    q_proj: CpuLinear,
    k_proj: CpuLinear,
    v_proj: CpuLinear,
    o_proj: CpuLinear,
    post_attention_layernorm: Tensor,
    gate_proj: CpuLinear,
    up_proj: CpuLinear,
    down_proj: CpuLinear,
}

pub struct CpuLlama {
    embed_tokens: Tensor,
    layers: Vec<CpuLayer>,
    norm: Tensor,
    lm_head: CpuLinear,
    rope: Rope,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

fn f32_vector(t: &Tensor, len: usize, name: &str) -> Result<Tensor> {
    ensure!(
        t.dims() == [len],
        "{name}: expected shape [{len}], got {:?}",
        t.dims()
    );
    Ok(t.to_dtype(DType::F32)?)
}

fn linear(
    l: &crate::model::weights::Linear,
    out: usize,
    inp: usize,
    name: &str,
) -> Result<CpuLinear> {
    let cpu = CpuLinear::new(l).with_context(|| name.to_string())?;
    ensure!(
        cpu.dims() == (inp, out),
        "{name}: expected weight shape [{out}, {inp}], got [{}, {}]",
        cpu.dims().1,
        cpu.dims().0
    );
    Ok(cpu)
}

impl CpuLayer {
    fn new(w: &LayerWeights, c: &LlamaConfig, i: usize) -> Result<Self> {
        let (h, q, kv, m) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
        let name = |n: &str| format!("model.layers.{i}.{n}");
        Ok(Self {
            input_layernorm: f32_vector(&w.input_layernorm, h, &name("input_layernorm"))?,
            q_proj: linear(&w.q_proj, q, h, &name("self_attn.q_proj"))?,
            k_proj: linear(&w.k_proj, kv, h, &name("self_attn.k_proj"))?,
            v_proj: linear(&w.v_proj, kv, h, &name("self_attn.v_proj"))?,
            o_proj: linear(&w.o_proj, h, q, &name("self_attn.o_proj"))?,
            post_attention_layernorm: f32_vector(
                &w.post_attention_layernorm,
                h,
                &name("post_attention_layernorm"),
            )?,
            gate_proj: linear(&w.gate_proj, m, h, &name("mlp.gate_proj"))?,
            up_proj: linear(&w.up_proj, m, h, &name("mlp.up_proj"))?,
            down_proj: linear(&w.down_proj, h, m, &name("mlp.down_proj"))?,
        })
    }
}

impl CpuLlama {
    /// Converts every weight to f32 once.
    pub fn new(c: &LlamaConfig, w: &LlamaWeights) -> Result<Self> {
        ensure!(
            w.layers.len() == c.num_hidden_layers,
            "weights have {} layers, config.json says {}",
            w.layers.len(),
            c.num_hidden_layers
        );
        let embed_dims = [c.vocab_size, c.hidden_size];
        ensure!(
            w.embed_tokens.dims() == embed_dims,
            "model.embed_tokens: expected shape {embed_dims:?}, got {:?}",
            w.embed_tokens.dims()
        );
        Ok(Self {
            embed_tokens: w.embed_tokens.to_dtype(DType::F32)?,
            layers: (w.layers.iter().enumerate())
                .map(|(i, l)| CpuLayer::new(l, c, i))
                .collect::<Result<_>>()?,
            norm: f32_vector(&w.norm, c.hidden_size, "model.norm")?,
            lm_head: linear(&w.lm_head, c.vocab_size, c.hidden_size, "lm_head")?,
            rope: Rope::new(c.rope_inv_freq()),
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps,
        })
    }

    /// Runs the chunks (already validated against the cache), writing their KV. Returns the
    /// last-token logits `[vocab]` of each chunk whose `emit` is not `Nothing`.
    pub fn forward(
        &self,
        seqs: &[SeqChunk],
        cache: &mut PagedKvCache,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let positions: Vec<usize> = seqs
            .iter()
            .flat_map(|s| s.start_pos..s.start_pos + s.tokens.len())
            .collect();
        let (cos, sin) = self.rope.tables(&positions)?;
        let ids = Tensor::from_vec(ids, positions.len(), &Device::Cpu)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_layernorm, self.eps)?;
            let attn = self.attention(i, layer, &h, seqs, &cos, &sin, cache)?;
            x = (x + layer.o_proj.forward(&attn)?)?;
            let h = rms_norm(&x, &layer.post_attention_layernorm, self.eps)?;
            let gate = layer.gate_proj.forward(&h)?.silu()?;
            let up = layer.up_proj.forward(&h)?;
            x = (x + layer.down_proj.forward(&(gate * up)?)?)?;
        }
        // lm_head only on the last token of the chunks that want output.
        let mut last_rows = vec![];
        let mut end = 0;
        for s in seqs {
            end += s.tokens.len();
            if s.emit != Emit::Nothing {
                last_rows.push(end as u32 - 1);
            }
        }
        let mut logits = if last_rows.is_empty() {
            vec![]
        } else {
            let rows = Tensor::new(last_rows.as_slice(), &Device::Cpu)?;
            let h = rms_norm(&x.index_select(&rows, 0)?, &self.norm, self.eps)?;
            self.lm_head.forward(&h)?.to_vec2::<f32>()?
        }
        .into_iter();
        Ok(seqs
            .iter()
            .map(|s| (s.emit != Emit::Nothing).then(|| logits.next()).flatten())
            .collect())
    }

    /// Self-attention of one layer: q/k/v for all rows, RoPE, KV written to the cache, then each
    /// sequence attends over its cached positions. Returns `[rows, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer_idx: usize,
        layer: &CpuLayer,
        h: &Tensor,
        seqs: &[SeqChunk],
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        let rows = h.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = layer.q_proj.forward(h)?.reshape((rows, nh, hd))?;
        let k = layer.k_proj.forward(h)?.reshape((rows, nkv, hd))?;
        let v = layer.v_proj.forward(h)?;
        let q = Rope::apply(&q, cos, sin)?;
        let k = Rope::apply(&k, cos, sin)?.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        let row = nkv * hd;
        let mut outputs = Vec::with_capacity(seqs.len());
        let mut first = 0;
        for s in seqs {
            let len = s.tokens.len();
            let span = first * row..(first + len) * row;
            cache.write(
                layer_idx,
                &s.block_table,
                s.start_pos,
                &k[span.clone()],
                &v[span],
            );
            let (k_all, v_all) = cache.gather(layer_idx, &s.block_table, s.start_pos + len)?;
            let q_seq = q.narrow(0, first, len)?;
            outputs.push(causal_attention(&q_seq, &k_all, &v_all, s.start_pos)?);
            first += len;
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }
}

/// `x / sqrt(mean(x²) + eps) · weight` per row of `x: [n, hidden]`.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (mean_sq + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
}
