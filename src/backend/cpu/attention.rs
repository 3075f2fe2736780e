//! Rotary position embeddings and causal grouped-query attention of one sequence's chunk over
//! its cached positions.

use anyhow::Result;
use candle_core::{Device, Tensor, D};

/// Rotary embedding with Hugging Face Llama's `rotate_half` convention: dimension `i` pairs with
/// `i + head_dim / 2`.
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(inv_freq: Vec<f64>) -> Self {
        Self { inv_freq }
    }

    /// `cos` and `sin` of every position, `[positions, head_dim / 2]` each.
    pub fn tables(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, &Device::Cpu)?,
            Tensor::from_vec(sin, shape, &Device::Cpu)?,
        ))
    }

    /// Rotates `x: [n, heads, head_dim]` at the rows' positions (`cos`, `sin` from `tables`).
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let cos = cos.unsqueeze(1)?;
        let sin = sin.unsqueeze(1)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let first = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let second = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[first, second], D::Minus1)?)
    }
}

/// Queries per attention block: bounds the score matrix of long prefills to
/// `heads x QUERY_BLOCK x positions` floats.
const QUERY_BLOCK: usize = 128;

/// Causal attention of `q: [len, heads, head_dim]` (positions `start_pos..start_pos + len`) over
/// `k`, `v: [kv_heads, start_pos + len, head_dim]`. Query head `h` reads KV head
/// `h / (heads / kv_heads)`. Returns `[len, heads * head_dim]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, start_pos: usize) -> Result<Tensor> {
    let len = q.dim(0)?;
    if len <= QUERY_BLOCK {
        return attention_block(q, k, v, start_pos);
    }
    let mut blocks = vec![];
    for first in (0..len).step_by(QUERY_BLOCK) {
        let n = QUERY_BLOCK.min(len - first);
        // A block sees only the positions up to its last query.
        let visible = start_pos + first + n;
        blocks.push(attention_block(
            &q.narrow(0, first, n)?,
            &k.narrow(1, 0, visible)?,
            &v.narrow(1, 0, visible)?.contiguous()?,
            start_pos + first,
        )?);
    }
    Ok(Tensor::cat(&blocks, 0)?)
}

fn attention_block(q: &Tensor, k: &Tensor, v: &Tensor, start_pos: usize) -> Result<Tensor> {
    let (len, heads, head_dim) = q.dims3()?;
    let (kv_heads, total, _) = k.dims3()?;
    let group = heads / kv_heads;
    // [heads, len, hd] -> [kv_heads, group * len, hd]: the queries sharing a KV head side by side.
    let q = q
        .transpose(0, 1)?
        .contiguous()?
        .reshape((kv_heads, group * len, head_dim))?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = scores
        .reshape((kv_heads, group, len, total))?
        .broadcast_add(&causal_mask(len, start_pos, total)?)?;
    let probs = softmax_last_dim(&scores)?.reshape((kv_heads, group * len, total))?;
    let out = probs.matmul(v)?; // [kv_heads, group * len, hd]
    Ok(out
        .reshape((heads, len, head_dim))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((len, heads * head_dim))?)
}

/// `[len, total]`: 0 where query `t` (position `start_pos + t`) may see key position `p`, else -inf.
fn causal_mask(len: usize, start_pos: usize, total: usize) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|t| {
            (0..total).map(move |p| {
                if p <= start_pos + t {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (len, total), &Device::Cpu)?)
}

fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index loops read like the math
mod tests {
    use super::*;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Naive loops: softmax(q·k / sqrt(d)) · v over visible positions, per head.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Vec<Vec<f32>> {
        let q = q.to_vec3::<f32>().unwrap();
        let k = k.to_vec3::<f32>().unwrap();
        let v = v.to_vec3::<f32>().unwrap();
        let (heads, kv_heads, d) = (q[0].len(), k.len(), q[0][0].len());
        q.iter()
            .enumerate()
            .map(|(t, qt)| {
                let mut row = vec![];
                for (h, qh) in qt.iter().enumerate() {
                    let kh = h / (heads / kv_heads);
                    let visible = start + t + 1;
                    let s: Vec<f32> = (0..visible)
                        .map(|p| {
                            (0..d).map(|i| qh[i] * k[kh][p][i]).sum::<f32>() / (d as f32).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for i in 0..d {
                        row.push((0..visible).map(|p| e[p] / z * v[kh][p][i]).sum());
                    }
                }
                row
            })
            .collect()
    }

    #[test]
    fn matches_naive_gqa_attention() {
        check_against_naive(3, 4);
        // Longer than one query block, so the blocked path runs too.
        check_against_naive(300, 20);
    }

    fn check_against_naive(len: usize, start: usize) {
        let (heads, kv_heads, d) = (4, 2, 8);
        let q = rand(&[len, heads, d], 1);
        let k = rand(&[kv_heads, start + len, d], 2);
        let v = rand(&[kv_heads, start + len, d], 3);
        let got = causal_attention(&q, &k, &v, start)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want = naive(&q, &k, &v, start);
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let rope = Rope::new(vec![1.0, 0.5]);
        let (cos, sin) = rope.tables(&[0, 2]).unwrap();
        let x = Tensor::new(
            &[[[1.0f32, 2.0, 3.0, 4.0]], [[1.0, 2.0, 3.0, 4.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let y = Rope::apply(&x, &cos, &sin)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        assert_eq!(y[0][0], vec![1.0, 2.0, 3.0, 4.0]);
        // Position 2: pair (x0, x2) rotates by 2 rad, pair (x1, x3) by 1 rad.
        let (c2, s2, c1, s1) = (2f32.cos(), 2f32.sin(), 1f32.cos(), 1f32.sin());
        let want = [
            1.0 * c2 - 3.0 * s2,
            2.0 * c1 - 4.0 * s1,
            3.0 * c2 + 1.0 * s2,
            4.0 * c1 + 2.0 * s1,
        ];
        for (g, w) in y[1][0].iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
