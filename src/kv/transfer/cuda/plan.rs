//! The address arithmetic of a device-to-device KV copy, free of any driver call (tested on CPU).
//!
//! A CUDA pool holds, per layer, a K pool then a V pool, each `[num_blocks, heads, block_size,
//! head_dim]`. In one block of one (layer, K|V) the heads are contiguous `[block_size, head_dim]`
//! slabs, so the heads a destination rank owns are one contiguous run: a TP split or merge is a
//! head offset on each side, the same cut as [`super::super::reshard`] makes in the wire format.

use crate::backend::{CudaKvPool, KvLayout};
use anyhow::{ensure, Result};

/// Heads `src_head0..src_head0+count` of a source rank go to `dst_head0..` of a destination rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadRoute {
    pub src_rank: usize,
    pub dst_rank: usize,
    pub src_head0: usize,
    pub dst_head0: usize,
    pub count: usize,
}

/// Which heads of which source rank land where, for `src_tp` ranks of `src_heads` heads each into
/// `dst_tp` ranks of `dst_heads` each (rank `r` owns global heads `r*h..(r+1)*h`). TP1 → TP2 gives
/// two routes, TP2 → TP1 two, TP2 → TP4 four.
pub fn head_routes(
    src_heads: usize,
    src_tp: usize,
    dst_heads: usize,
    dst_tp: usize,
) -> Result<Vec<HeadRoute>> {
    ensure!(
        src_heads > 0 && dst_heads > 0 && src_tp > 0 && dst_tp > 0,
        "KV head routes need positive head counts and TP sizes"
    );
    ensure!(
        src_heads * src_tp == dst_heads * dst_tp,
        "source holds {src_tp}x{src_heads} KV heads, destination {dst_tp}x{dst_heads}"
    );
    let mut routes = Vec::new();
    for src_rank in 0..src_tp {
        let (s0, s1) = (src_rank * src_heads, (src_rank + 1) * src_heads);
        for dst_rank in 0..dst_tp {
            let (d0, d1) = (dst_rank * dst_heads, (dst_rank + 1) * dst_heads);
            let (a, b) = (s0.max(d0), s1.min(d1));
            if a < b {
                routes.push(HeadRoute {
                    src_rank,
                    dst_rank,
                    src_head0: a - s0,
                    dst_head0: a - d0,
                    count: b - a,
                });
            }
        }
    }
    Ok(routes)
}

/// Byte strides of a pool, as the copy kernel takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStrides {
    /// One `[block_size, head_dim]` slab of one head.
    pub slab: usize,
    /// One block of one (layer, K|V) pool: `heads` slabs.
    pub block: usize,
    /// One (layer, K|V) pool: `num_blocks` blocks.
    pub part: usize,
}

impl PoolStrides {
    pub fn of(layout: &KvLayout, num_blocks: usize) -> Self {
        let slab = layout.block_size * layout.head_dim * layout.dtype.size_bytes();
        let block = layout.num_kv_heads * slab;
        Self {
            slab,
            block,
            part: num_blocks * block,
        }
    }

    /// Offset of `head` in `block` of layer `layer`'s K (`kv = 0`) or V (`kv = 1`) pool.
    pub fn offset(&self, layer: usize, kv: usize, block: usize, head: usize) -> usize {
        (2 * layer + kv) * self.part + block * self.block + head * self.slab
    }
}

/// One launch of the copy kernel: `pairs` of (source block, destination block), the heads of
/// `route`, every layer (or the ones asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyGeometry {
    pub src: PoolStrides,
    pub dst: PoolStrides,
    pub src_head_off: usize,
    pub dst_head_off: usize,
    pub run_bytes: usize,
    pub num_layers: usize,
}

/// Checks that `route` fits both pools, that the pools agree on everything but the head count and
/// that the kernel's 16-byte accesses stay aligned; returns the strides and offsets to launch with.
pub fn geometry(src: &CudaKvPool, dst: &CudaKvPool, route: &HeadRoute) -> Result<CopyGeometry> {
    let (s, d) = (&src.layout, &dst.layout);
    ensure!(
        s.num_layers == d.num_layers
            && s.head_dim == d.head_dim
            && s.block_size == d.block_size
            && s.dtype == d.dtype,
        "KV pools differ in more than their head count: source {s:?}, destination {d:?}"
    );
    ensure!(
        route.count > 0
            && route.src_head0 + route.count <= s.num_kv_heads
            && route.dst_head0 + route.count <= d.num_kv_heads,
        "heads {route:?} do not fit a source of {} and a destination of {} heads",
        s.num_kv_heads,
        d.num_kv_heads
    );
    let (src_strides, dst_strides) = (
        PoolStrides::of(s, src.num_blocks),
        PoolStrides::of(d, dst.num_blocks),
    );
    ensure!(
        src_strides.slab.is_multiple_of(16)
            && src.base.is_multiple_of(16)
            && dst.base.is_multiple_of(16),
        "the KV copy kernel needs 16-byte aligned pools and slabs (slab of {} bytes)",
        src_strides.slab
    );
    for (pool, strides, name) in [
        (src, src_strides, "source"),
        (dst, dst_strides, "destination"),
    ] {
        ensure!(
            2 * pool.layout.num_layers * strides.part <= pool.bytes,
            "{name} pool of {} bytes is smaller than its layout ({} blocks)",
            pool.bytes,
            pool.num_blocks
        );
    }
    Ok(CopyGeometry {
        src: src_strides,
        dst: dst_strides,
        src_head_off: route.src_head0 * src_strides.slab,
        dst_head_off: route.dst_head0 * dst_strides.slab,
        run_bytes: route.count * src_strides.slab,
        num_layers: s.num_layers,
    })
}

/// Checks block ids against both pools; returns them flattened as the kernel reads them.
pub fn flatten_pairs(
    pairs: &[(u32, u32)],
    src_blocks: usize,
    dst_blocks: usize,
) -> Result<Vec<u32>> {
    let mut flat = Vec::with_capacity(2 * pairs.len());
    for &(s, d) in pairs {
        ensure!(
            (s as usize) < src_blocks && (d as usize) < dst_blocks,
            "KV block pair ({s}, {d}) out of range: source has {src_blocks} blocks, destination {dst_blocks}"
        );
        flat.extend([s, d]);
    }
    Ok(flat)
}

/// What the kernel does, on host byte slices: the reference the tests compare against.
pub fn copy_on_host(src: &[u8], dst: &mut [u8], g: &CopyGeometry, pairs: &[(u32, u32)]) {
    for &(sb, db) in pairs {
        for layer in 0..g.num_layers {
            for kv in 0..2 {
                let s = g.src.offset(layer, kv, sb as usize, 0) + g.src_head_off;
                let d = g.dst.offset(layer, kv, db as usize, 0) + g.dst_head_off;
                dst[d..d + g.run_bytes].copy_from_slice(&src[s..s + g.run_bytes]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KvDtype;
    use crate::kv::transfer::{reshard, KvShards};

    fn layout(heads: usize) -> KvLayout {
        KvLayout {
            num_layers: 3,
            num_kv_heads: heads,
            head_dim: 4,
            block_size: 2,
            dtype: KvDtype::F32,
        }
    }

    fn pool(heads: usize, num_blocks: usize) -> CudaKvPool {
        let layout = layout(heads);
        CudaKvPool {
            device: 0,
            base: 256,
            bytes: num_blocks * layout.block_bytes(),
            num_blocks,
            layout,
        }
    }

    /// `export_blocks` written out plainly: per block, per layer, K then V, the block's heads.
    fn export(bytes: &[u8], p: &CudaKvPool, blocks: &[u32]) -> Vec<u8> {
        let l = p.layout;
        let slab = l.block_size * l.head_dim * l.dtype.size_bytes();
        let mut out = Vec::new();
        for &b in blocks {
            for layer in 0..l.num_layers {
                for kv in 0..2 {
                    let part = (layer * 2 + kv) * p.num_blocks * l.num_kv_heads;
                    let at = (part + b as usize * l.num_kv_heads) * slab;
                    out.extend_from_slice(&bytes[at..at + l.num_kv_heads * slab]);
                }
            }
        }
        out
    }

    fn import(bytes: &mut [u8], p: &CudaKvPool, blocks: &[u32], data: &[u8]) {
        let l = p.layout;
        let run = l.num_kv_heads * l.block_size * l.head_dim * l.dtype.size_bytes();
        let mut chunks = data.chunks(run);
        for &b in blocks {
            for layer in 0..l.num_layers {
                for kv in 0..2 {
                    let at = ((layer * 2 + kv) * p.num_blocks + b as usize) * run;
                    bytes[at..at + run].copy_from_slice(chunks.next().unwrap());
                }
            }
        }
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn routes_split_and_merge_heads() {
        let r = head_routes(8, 1, 4, 2).unwrap();
        assert_eq!(
            r,
            vec![
                HeadRoute {
                    src_rank: 0,
                    dst_rank: 0,
                    src_head0: 0,
                    dst_head0: 0,
                    count: 4
                },
                HeadRoute {
                    src_rank: 0,
                    dst_rank: 1,
                    src_head0: 4,
                    dst_head0: 0,
                    count: 4
                },
            ]
        );
        let r = head_routes(4, 2, 8, 1).unwrap();
        assert_eq!(
            r[1],
            HeadRoute {
                src_rank: 1,
                dst_rank: 0,
                src_head0: 0,
                dst_head0: 4,
                count: 4
            }
        );
        // TP2 -> TP4: each source rank feeds two destination ranks.
        let r = head_routes(4, 2, 2, 4).unwrap();
        assert_eq!(r.len(), 4);
        assert!(r
            .iter()
            .all(|x| x.count == 2 && x.src_rank == x.dst_rank / 2));
        assert!(head_routes(8, 1, 3, 2).is_err());
    }

    /// Copying device blocks along the routes leaves every destination pool byte for byte as
    /// export → reshard → import does (untouched blocks included).
    #[test]
    fn routed_copies_equal_export_reshard_import() {
        let total = 4;
        let (src_blocks, dst_blocks) = (5u32, 9u32);
        let src_ids = [3u32, 0, 4];
        let dst_ids = [7u32, 2, 5];
        let pairs: Vec<(u32, u32)> = src_ids.iter().copied().zip(dst_ids).collect();
        for (src_tp, dst_tp) in [(1, 1), (1, 2), (2, 1), (1, 4), (4, 1), (2, 4), (4, 2)] {
            let src_pool = pool(total / src_tp, src_blocks as usize);
            let dst_pool = pool(total / dst_tp, dst_blocks as usize);
            let src: Vec<Vec<u8>> = (0..src_tp)
                .map(|r| noise(src_pool.bytes, r as u64 + 1))
                .collect();
            let poison = vec![0xEEu8; dst_pool.bytes];

            let shards = KvShards {
                rank_layout: src_pool.layout,
                shards: src.iter().map(|s| export(s, &src_pool, &src_ids)).collect(),
            };
            let cut = reshard(&shards, dst_tp).unwrap();
            assert_eq!(cut.rank_layout, dst_pool.layout);
            let mut want = vec![poison.clone(); dst_tp];
            for (r, data) in cut.shards.iter().enumerate() {
                import(&mut want[r], &dst_pool, &dst_ids, data);
            }

            let mut got = vec![poison.clone(); dst_tp];
            let routes = head_routes(total / src_tp, src_tp, total / dst_tp, dst_tp).unwrap();
            for route in &routes {
                let g = geometry(&src_pool, &dst_pool, route).unwrap();
                copy_on_host(&src[route.src_rank], &mut got[route.dst_rank], &g, &pairs);
            }
            assert!(got == want, "{src_tp} -> {dst_tp}");
        }
    }

    #[test]
    fn refuses_mismatched_pools_and_blocks() {
        let route = HeadRoute {
            src_rank: 0,
            dst_rank: 0,
            src_head0: 0,
            dst_head0: 0,
            count: 2,
        };
        let mut other = pool(2, 4);
        other.layout.block_size = 4;
        assert!(geometry(&pool(2, 4), &other, &route).is_err());
        let too_many = HeadRoute { count: 3, ..route };
        assert!(geometry(&pool(2, 4), &pool(2, 4), &too_many).is_err());
        let mut small = pool(2, 4);
        small.bytes -= 1;
        assert!(geometry(&pool(2, 4), &small, &route).is_err());
        let err = flatten_pairs(&[(0, 1), (4, 0)], 4, 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("(4, 0) out of range"), "{err}");
        assert_eq!(
            flatten_pairs(&[(1, 7), (3, 0)], 4, 8).unwrap(),
            vec![1, 7, 3, 0]
        );
    }
}
