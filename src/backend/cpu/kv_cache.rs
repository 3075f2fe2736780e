//! The paged KV cache in host memory: per layer a K and a V pool, each
//! `[num_blocks, num_kv_heads, block_size, head_dim]` f32.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

pub struct PagedKvCache {
    pub num_blocks: usize,
    pub num_kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
    /// `(K, V)` per layer.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl PagedKvCache {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        num_kv_heads: usize,
        block_size: usize,
        head_dim: usize,
    ) -> Self {
        let pool = num_blocks * num_kv_heads * block_size * head_dim;
        Self {
            num_blocks,
            num_kv_heads,
            block_size,
            head_dim,
            layers: (0..num_layers)
                .map(|_| (vec![0.0; pool], vec![0.0; pool]))
                .collect(),
        }
    }

    /// Floats of one block in one pool.
    fn block_len(&self) -> usize {
        self.num_kv_heads * self.block_size * self.head_dim
    }

    /// Offset of `(position, head)` in a pool, through the block table.
    fn offset(&self, block_table: &[u32], position: usize, head: usize) -> usize {
        let block = block_table[position / self.block_size] as usize;
        let slot = position % self.block_size;
        ((block * self.num_kv_heads + head) * self.block_size + slot) * self.head_dim
    }

    /// Stores the K and V rows (`[num_kv_heads * head_dim]` each) of consecutive positions
    /// starting at `start_pos`. The caller has validated the block table.
    pub fn write(
        &mut self,
        layer: usize,
        block_table: &[u32],
        start_pos: usize,
        k_rows: &[f32],
        v_rows: &[f32],
    ) {
        let row = self.num_kv_heads * self.head_dim;
        let hd = self.head_dim;
        for (t, (k, v)) in k_rows.chunks(row).zip(v_rows.chunks(row)).enumerate() {
            for h in 0..self.num_kv_heads {
                let at = self.offset(block_table, start_pos + t, h);
                let (kp, vp) = &mut self.layers[layer];
                kp[at..at + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
                vp[at..at + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
            }
        }
    }

    /// K and V of positions `0..len`, each `[num_kv_heads, len, head_dim]`.
    pub fn gather(
        &self,
        layer: usize,
        block_table: &[u32],
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let hd = self.head_dim;
        let (kp, vp) = &self.layers[layer];
        let mut k = Vec::with_capacity(self.num_kv_heads * len * hd);
        let mut v = Vec::with_capacity(self.num_kv_heads * len * hd);
        for h in 0..self.num_kv_heads {
            for p in 0..len {
                let at = self.offset(block_table, p, h);
                k.extend_from_slice(&kp[at..at + hd]);
                v.extend_from_slice(&vp[at..at + hd]);
            }
        }
        let shape = (self.num_kv_heads, len, hd);
        Ok((
            Tensor::from_vec(k, shape, &Device::Cpu)?,
            Tensor::from_vec(v, shape, &Device::Cpu)?,
        ))
    }

    fn check_blocks(&self, blocks: &[u32]) -> Result<()> {
        for &b in blocks {
            ensure!(
                (b as usize) < self.num_blocks,
                "KV block id {b} is out of range (the cache has {} blocks)",
                self.num_blocks
            );
        }
        Ok(())
    }

    /// Wire format of `Backend::export_blocks`: per block, per layer, K then V, f32 little endian.
    pub fn export(&self, blocks: &[u32]) -> Result<Vec<u8>> {
        self.check_blocks(blocks)?;
        let n = self.block_len();
        let mut out = Vec::with_capacity(blocks.len() * self.layers.len() * 2 * n * 4);
        for &b in blocks {
            let range = b as usize * n..(b as usize + 1) * n;
            for (kp, vp) in &self.layers {
                for pool in [kp, vp] {
                    for x in &pool[range.clone()] {
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
        Ok(out)
    }

    pub fn import(&mut self, blocks: &[u32], data: &[u8]) -> Result<()> {
        self.check_blocks(blocks)?;
        let n = self.block_len();
        let want = blocks.len() * self.layers.len() * 2 * n * 4;
        ensure!(
            data.len() == want,
            "KV import of {} blocks needs {want} bytes, got {}",
            blocks.len(),
            data.len()
        );
        let mut floats = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        for &b in blocks {
            let range = b as usize * n..(b as usize + 1) * n;
            for (kp, vp) in &mut self.layers {
                for pool in [kp, vp] {
                    for x in &mut pool[range.clone()] {
                        // Length checked above, so the iterator cannot run dry.
                        *x = floats.next().unwrap_or(0.0);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index loops read like the math
mod tests {
    use super::*;

    #[test]
    fn write_then_gather_follows_the_block_table() {
        // 2 layers, 4 blocks, 2 heads, block size 3, head dim 2.
        let mut cache = PagedKvCache::new(2, 4, 2, 3, 2);
        let table = [2u32, 0];
        // 5 positions, row = 2 heads * 2 dims; value encodes (position, head, dim).
        let rows: Vec<f32> = (0..5)
            .flat_map(|p| (0..4).map(move |i| (p * 10 + i) as f32))
            .collect();
        let neg: Vec<f32> = rows.iter().map(|x| -x).collect();
        cache.write(1, &table, 0, &rows[..8], &neg[..8]);
        cache.write(1, &table, 2, &rows[8..], &neg[8..]);
        let (k, v) = cache.gather(1, &table, 5).unwrap();
        let k = k.to_vec3::<f32>().unwrap();
        for p in 0..5 {
            for h in 0..2 {
                for d in 0..2 {
                    assert_eq!(k[h][p][d], (p * 10 + h * 2 + d) as f32);
                }
            }
        }
        assert_eq!(v.to_vec3::<f32>().unwrap()[1][4][1], -43.0);
        // Layer 0 untouched; export/import moves exactly the named blocks.
        let (k0, _) = cache.gather(0, &table, 5).unwrap();
        assert!(k0
            .to_vec3::<f32>()
            .unwrap()
            .iter()
            .flatten()
            .flatten()
            .all(|&x| x == 0.0));
        let data = cache.export(&[2, 0]).unwrap();
        assert_eq!(data.len(), 2 * 2 * 2 * (2 * 3 * 2) * 4);
        let mut other = PagedKvCache::new(2, 4, 2, 3, 2);
        other.import(&[1, 3], &data).unwrap();
        let (k2, v2) = other.gather(1, &[1, 3], 5).unwrap();
        assert_eq!(k2.to_vec3::<f32>().unwrap(), k);
        assert_eq!(v2.to_vec3::<f32>().unwrap(), v.to_vec3::<f32>().unwrap());
        assert!(other.import(&[4], &data[..96]).is_err());
        assert!(other.import(&[1], &data[..95]).is_err());
    }
}
