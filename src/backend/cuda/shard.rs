//! Tensor-parallel sharding (Megatron style): what rank `r` of `world` holds.
//!
//! - q/k/v (column-parallel): attention heads `r·H/world ..` and KV heads `r·KV/world ..`, so
//!   attention runs on local heads only; the KV pool of a rank holds its KV heads (the
//!   per-rank layout of `kv::transfer::reshard`).
//! - gate/up (column-parallel): rows `r·I/world ..` of each.
//! - o/down (row-parallel): the matching input columns; their outputs are partial sums, all-reduced.
//!   FP8 per-output-channel scales are whole (the output dimension is not split); a column-parallel
//!   linear's scales are cut with its rows.
//! - embedding (vocab-parallel): rows of the rank's vocab range, padded like lm_head's; the embed
//!   kernel writes zeros for tokens outside the range (ids go to the GPU as they are), and the
//!   all-reduce of the embedded rows sums to the full embedding.
//! - lm_head (vocab-parallel): rows of the vocab range, padded with zero rows to
//!   `ceil(vocab / world)` so every rank's logits have the same size (NCCL all-gather); the padding
//!   columns are dropped when the gathered logits are laid out as `[rows, vocab]`.
//!
//! The shard of a config is a config: the backend of one rank is the ordinary one-GPU forward
//! over the local config, plus the all-reduces.

use crate::model::config::LlamaConfig;
use crate::model::weights::{LayerWeights, Linear, LlamaWeights};
use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    /// Can `world` ranks split this model? (KV heads and the MLP width must divide.)
    pub fn check(config: &LlamaConfig, world: usize) -> Result<()> {
        ensure!(world >= 1, "--tensor-parallel-size must be at least 1");
        ensure!(
            config.num_key_value_heads.is_multiple_of(world),
            "--tensor-parallel-size {world} does not divide the model's {} KV heads",
            config.num_key_value_heads
        );
        ensure!(
            config.num_attention_heads.is_multiple_of(world)
                && config.intermediate_size.is_multiple_of(world),
            "--tensor-parallel-size {world} does not divide {} attention heads / intermediate size {}",
            config.num_attention_heads,
            config.intermediate_size
        );
        Ok(())
    }

    /// Logit columns (and lm_head rows) per rank, padding included.
    pub fn vocab_per_rank(&self, vocab: usize) -> usize {
        vocab.div_ceil(self.world)
    }

    /// The token ids this rank embeds and scores (the last rank's may be short).
    pub fn vocab_range(&self, vocab: usize) -> Range<usize> {
        let per = self.vocab_per_rank(vocab);
        (self.rank * per).min(vocab)..((self.rank + 1) * per).min(vocab)
    }

    /// The config of one rank's model: local heads, MLP width and (padded) vocab slice.
    pub fn local_config(&self, full: &LlamaConfig) -> Result<LlamaConfig> {
        Self::check(full, self.world)?;
        ensure!(
            self.rank < self.world,
            "rank {} of {}",
            self.rank,
            self.world
        );
        let mut c = full.clone();
        c.num_attention_heads /= self.world;
        c.num_key_value_heads /= self.world;
        c.intermediate_size /= self.world;
        c.vocab_size = self.vocab_per_rank(full.vocab_size);
        Ok(c)
    }

    /// This rank's weights, cut from the full host weights (copies only the rank's slices).
    pub fn weights(&self, full: &LlamaConfig, w: &LlamaWeights) -> Result<LlamaWeights> {
        let local = self.local_config(full)?;
        if self.world == 1 {
            return Ok(w.clone());
        }
        let (hd, r) = (full.head_dim, self.rank);
        let q = local.num_attention_heads * hd;
        let kv = local.num_key_value_heads * hd;
        let inter = local.intermediate_size;
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    input_layernorm: l.input_layernorm.clone(),
                    q_proj: rows(&l.q_proj, r * q, q)?,
                    k_proj: rows(&l.k_proj, r * kv, kv)?,
                    v_proj: rows(&l.v_proj, r * kv, kv)?,
                    o_proj: cols(&l.o_proj, r * q, q)?,
                    post_attention_layernorm: l.post_attention_layernorm.clone(),
                    gate_proj: rows(&l.gate_proj, r * inter, inter)?,
                    up_proj: rows(&l.up_proj, r * inter, inter)?,
                    down_proj: cols(&l.down_proj, r * inter, inter)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab = full.vocab_size;
        let per = self.vocab_per_rank(vocab);
        let embed_tokens = padded_rows(&w.embed_tokens, self.vocab_range(vocab), per)?;
        // An FP8 lm_head is dequantized at upload anyway; cut the dequantized rows.
        let lm = match &w.lm_head {
            Linear::Dense { weight } => weight.clone(),
            Linear::Fp8 { weight, scale } => weight
                .to_dtype(DType::F32)?
                .broadcast_mul(&scale.to_dtype(DType::F32)?)?,
        };
        let lm_head = Linear::Dense {
            weight: padded_rows(&lm, self.vocab_range(vocab), per)?,
        };
        Ok(LlamaWeights {
            embed_tokens,
            layers,
            norm: w.norm.clone(),
            lm_head,
        })
    }
}

fn narrow(t: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let n = t.dims()[dim];
    ensure!(
        start + len <= n,
        "shard {start}..{} of a dimension of {n}",
        start + len
    );
    Ok(t.narrow(dim, start, len)?.contiguous()?)
}

/// Output rows `start..start+len` (column-parallel); FP8 scales follow their rows.
fn rows(l: &Linear, start: usize, len: usize) -> Result<Linear> {
    Ok(match l {
        Linear::Dense { weight } => Linear::Dense {
            weight: narrow(weight, 0, start, len)?,
        },
        Linear::Fp8 { weight, scale } => Linear::Fp8 {
            weight: narrow(weight, 0, start, len)?,
            scale: narrow(scale, 0, start, len)?,
        },
    })
}

/// Input columns `start..start+len` (row-parallel); per-output-channel scales stay whole.
fn cols(l: &Linear, start: usize, len: usize) -> Result<Linear> {
    Ok(match l {
        Linear::Dense { weight } => Linear::Dense {
            weight: narrow(weight, 1, start, len)?,
        },
        Linear::Fp8 { weight, scale } => Linear::Fp8 {
            weight: narrow(weight, 1, start, len)?,
            scale: scale.clone(),
        },
    })
}

/// Rows `range` of `[n, k]`, then zero rows up to `total`.
fn padded_rows(t: &Tensor, range: Range<usize>, total: usize) -> Result<Tensor> {
    let k = t.dim(1)?;
    let taken = narrow(t, 0, range.start, range.len())?;
    if range.len() == total {
        return Ok(taken);
    }
    let zeros = Tensor::zeros((total - range.len(), k), t.dtype(), t.device())?;
    Ok(Tensor::cat(&[&taken, &zeros], 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{load_weights, LoadFormat, ModelFiles};

    fn preset(name: &str) -> LlamaConfig {
        ModelFiles::resolve(name).unwrap().config
    }

    fn fixture(name: &str) -> ModelFiles {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        ModelFiles::resolve(dir.join(name).to_str().unwrap()).unwrap()
    }

    #[test]
    fn the_70b_config_splits_over_1_2_4_8_ranks() {
        let full = preset("llama-3.3-70b-fp8-dynamic");
        for world in [1, 2, 4, 8] {
            let mut vocab_seen = 0;
            for rank in 0..world {
                let s = Shard { rank, world };
                let c = s.local_config(&full).unwrap();
                assert_eq!(c.num_attention_heads, 64 / world);
                assert_eq!(c.num_key_value_heads, 8 / world);
                assert_eq!(c.intermediate_size, 28672 / world);
                assert_eq!(c.hidden_size, 8192);
                assert_eq!(c.vocab_size, 128256 / world);
                let r = s.vocab_range(full.vocab_size);
                assert_eq!(r.start, vocab_seen);
                vocab_seen = r.end;
                // Every rank's share of q heads keeps the group size of GQA.
                assert_eq!(
                    c.num_attention_heads / c.num_key_value_heads,
                    full.num_attention_heads / full.num_key_value_heads
                );
            }
            assert_eq!(vocab_seen, full.vocab_size);
        }
        for world in [3, 16] {
            let e = Shard { rank: 0, world }.local_config(&full).unwrap_err();
            assert!(e.to_string().contains("KV heads"), "{e}");
        }
    }

    #[test]
    fn uneven_vocab_pads_the_last_rank() {
        let mut c = preset("llama-3.3-70b-fp8-dynamic");
        c.vocab_size = 10;
        let shards: Vec<Shard> = (0..4).map(|rank| Shard { rank, world: 4 }).collect();
        let ranges: Vec<_> = shards.iter().map(|s| s.vocab_range(10)).collect();
        assert_eq!(ranges, [0..3, 3..6, 6..9, 9..10]);
        assert!(shards
            .iter()
            .all(|s| s.local_config(&c).unwrap().vocab_size == 3));
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn cat(parts: &[Tensor], dim: usize) -> Vec<f32> {
        f32s(&Tensor::cat(parts, dim).unwrap())
    }

    /// The shards of every tensor, put back together, are the original; replicated ones are equal.
    fn check_roundtrip(name: &str, world: usize) {
        let files = fixture(name);
        let full = &files.config;
        let w = load_weights(&files, LoadFormat::Safetensors, 0).unwrap();
        let shards: Vec<LlamaWeights> = (0..world)
            .map(|rank| Shard { rank, world }.weights(full, &w).unwrap())
            .collect();
        let vocab = full.vocab_size;
        let per = vocab.div_ceil(world);
        let h = full.hidden_size;
        // Embedding: each rank's first `range.len()` rows; the padding is zero.
        let mut embed = vec![];
        for (rank, s) in shards.iter().enumerate() {
            let r = Shard { rank, world }.vocab_range(vocab);
            let rows = f32s(&s.embed_tokens);
            assert_eq!(rows.len(), per * h);
            embed.extend_from_slice(&rows[..r.len() * h]);
            assert!(rows[r.len() * h..].iter().all(|&x| x == 0.0));
        }
        assert_eq!(embed, f32s(&w.embed_tokens), "{name} embed, world {world}");
        let lm: Vec<Tensor> = shards.iter().map(|s| s.lm_head.weight().clone()).collect();
        let full_lm = match &w.lm_head {
            Linear::Dense { weight } => f32s(weight),
            Linear::Fp8 { weight, scale } => f32s(
                &weight
                    .to_dtype(DType::F32)
                    .unwrap()
                    .broadcast_mul(&scale.to_dtype(DType::F32).unwrap())
                    .unwrap(),
            ),
        };
        assert_eq!(&cat(&lm, 0)[..vocab * h], &full_lm[..]);
        for (i, l) in w.layers.iter().enumerate() {
            let part = |f: &dyn Fn(&LayerWeights) -> &Linear| -> (Vec<Tensor>, Vec<Tensor>) {
                shards
                    .iter()
                    .map(|s| match f(&s.layers[i]) {
                        Linear::Dense { weight } => (
                            weight.clone(),
                            Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu).unwrap(),
                        ),
                        Linear::Fp8 { weight, scale } => (weight.clone(), scale.clone()),
                    })
                    .unzip()
            };
            type Pick = fn(&LayerWeights) -> &Linear;
            let column: [(Pick, &str); 5] = [
                (|l| &l.q_proj, "q"),
                (|l| &l.k_proj, "k"),
                (|l| &l.v_proj, "v"),
                (|l| &l.gate_proj, "gate"),
                (|l| &l.up_proj, "up"),
            ];
            for (pick, what) in column {
                let (ws, scales) = part(&pick);
                assert_eq!(
                    cat(&ws, 0),
                    f32s(pick(l).weight()),
                    "{name} layer {i} {what}"
                );
                if let Linear::Fp8 { scale, .. } = pick(l) {
                    assert_eq!(
                        cat(&scales, 0),
                        f32s(scale),
                        "{name} layer {i} {what} scale"
                    );
                }
            }
            let row: [(Pick, &str); 2] = [(|l| &l.o_proj, "o"), (|l| &l.down_proj, "down")];
            for (pick, what) in row {
                let (ws, scales) = part(&pick);
                assert_eq!(
                    cat(&ws, 1),
                    f32s(pick(l).weight()),
                    "{name} layer {i} {what}"
                );
                if let Linear::Fp8 { scale, .. } = pick(l) {
                    for s in &scales {
                        assert_eq!(f32s(s), f32s(scale), "{name} layer {i} {what} scale");
                    }
                }
            }
            for s in &shards {
                assert_eq!(f32s(&s.layers[i].input_layernorm), f32s(&l.input_layernorm));
            }
        }
    }

    #[test]
    fn fixture_shards_put_back_together_equal_the_checkpoint() {
        for name in ["llama-bf16", "llama-fp8"] {
            for world in [1, 2] {
                check_roundtrip(name, world);
            }
        }
    }

    #[test]
    fn fixtures_cannot_split_over_4_ranks() {
        let files = fixture("llama-bf16");
        assert!(Shard::check(&files.config, 2).is_ok());
        assert!(Shard::check(&files.config, 4).is_err());
    }
}
