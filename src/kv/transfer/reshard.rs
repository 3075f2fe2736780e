//! Splitting and merging KV heads between tensor-parallel layouts.
//!
//! With tensor parallelism of size `tp`, rank `r` holds KV heads `r*h .. (r+1)*h` where
//! `h = num_kv_heads / tp`. In the wire format every (block, layer, K|V) holds its heads one after
//! the other, each a contiguous `[block_size, head_dim]` slab, so resharding is a copy of slabs.

use super::KvShards;
use crate::backend::KvLayout;
use anyhow::{ensure, Result};

/// Re-cuts `src` into `dst_tp` shards. Any source and destination TP sizes that divide the total
/// number of KV heads work: TP1 → TP4 splits, TP2 → TP1 merges, TP2 → TP4 does both.
pub fn reshard(src: &KvShards, dst_tp: usize) -> Result<KvShards> {
    let num_blocks = src.num_blocks()?;
    let src_tp = src.tp();
    if src_tp == dst_tp {
        return Ok(src.clone());
    }
    let total_heads = src.rank_layout.num_kv_heads * src_tp;
    ensure!(
        dst_tp > 0 && total_heads.is_multiple_of(dst_tp),
        "cannot split {total_heads} KV heads over {dst_tp} destination ranks"
    );
    let dst_layout = KvLayout {
        num_kv_heads: total_heads / dst_tp,
        ..src.rank_layout
    };
    let slab =
        src.rank_layout.block_size * src.rank_layout.head_dim * src.rank_layout.dtype.size_bytes();
    let (src_heads, dst_heads) = (src.rank_layout.num_kv_heads, dst_layout.num_kv_heads);
    // (block, layer, K|V) groups, each holding `heads` slabs.
    let groups = num_blocks * src.rank_layout.num_layers * 2;

    let mut shards: Vec<Vec<u8>> = (0..dst_tp)
        .map(|_| Vec::with_capacity(groups * dst_heads * slab))
        .collect();
    for group in 0..groups {
        for (dst_rank, out) in shards.iter_mut().enumerate() {
            for local in 0..dst_heads {
                let head = dst_rank * dst_heads + local;
                let (src_rank, src_local) = (head / src_heads, head % src_heads);
                let start = (group * src_heads + src_local) * slab;
                out.extend_from_slice(&src.shards[src_rank][start..start + slab]);
            }
        }
    }
    Ok(KvShards {
        rank_layout: dst_layout,
        shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KvDtype;

    fn layout(heads: usize) -> KvLayout {
        KvLayout {
            num_layers: 3,
            num_kv_heads: heads,
            head_dim: 4,
            block_size: 2,
            dtype: KvDtype::F32,
        }
    }

    /// Naive reference: the value stored for (block, layer, kv, global head, slot, dim).
    fn value(b: usize, l: usize, kv: usize, head: usize, s: usize, d: usize) -> f32 {
        (((((b * 10 + l) * 2 + kv) * 10 + head) * 10 + s) * 10 + d) as f32
    }

    /// Builds the shards of a TP-`tp` holder of `total` heads, straight from the index formula.
    fn build(num_blocks: usize, total: usize, tp: usize) -> KvShards {
        let l = layout(total / tp);
        let shards = (0..tp)
            .map(|rank| {
                let mut out = Vec::new();
                for b in 0..num_blocks {
                    for layer in 0..l.num_layers {
                        for kv in 0..2 {
                            for local in 0..l.num_kv_heads {
                                for s in 0..l.block_size {
                                    for d in 0..l.head_dim {
                                        let head = rank * l.num_kv_heads + local;
                                        out.extend_from_slice(
                                            &value(b, layer, kv, head, s, d).to_le_bytes(),
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
                out
            })
            .collect();
        KvShards {
            rank_layout: l,
            shards,
        }
    }

    #[test]
    fn split_and_merge_match_the_index_formula() {
        for (src_tp, dst_tp) in [(1, 2), (2, 1), (1, 4), (4, 1), (2, 4), (4, 2), (2, 2)] {
            let src = build(3, 4, src_tp);
            let got = reshard(&src, dst_tp).unwrap();
            let want = build(3, 4, dst_tp);
            assert_eq!(got.rank_layout, want.rank_layout, "{src_tp}->{dst_tp}");
            assert_eq!(got.shards, want.shards, "{src_tp}->{dst_tp}");
        }
    }

    #[test]
    fn round_trip_restores_the_source() {
        let src = build(2, 8, 1);
        let there = reshard(&src, 8).unwrap();
        assert_eq!(there.rank_layout.num_kv_heads, 1);
        assert_eq!(reshard(&there, 1).unwrap().shards, src.shards);
    }

    #[test]
    fn refuses_a_tp_that_does_not_divide_the_heads() {
        let err = reshard(&build(1, 4, 1), 3).unwrap_err().to_string();
        assert!(err.contains("cannot split 4 KV heads over 3"), "{err}");
    }

    #[test]
    fn refuses_ragged_shards() {
        let mut src = build(2, 4, 2);
        src.shards[1].pop();
        assert!(reshard(&src, 1).is_err());
    }
}
