//! The router's estimate of what one worker holds in its prefix cache: the block hashes of the
//! prompts routed to it, oldest forgotten first.

use std::collections::{HashSet, VecDeque};

/// Hash chain over full blocks: block i's hash covers every token of blocks 0..=i, so equal
/// hashes mean equal prefixes. (xxh3 over the parent hash and the block's tokens.)
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = 0u64;
    let mut bytes = Vec::with_capacity(8 + 4 * block_size);
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            bytes.clear();
            bytes.extend_from_slice(&parent.to_le_bytes());
            block
                .iter()
                .for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
            parent = xxhash_rust::xxh3::xxh3_64(&bytes);
            parent
        })
        .collect()
}

pub struct KvIndex {
    capacity: usize,
    present: HashSet<u64>,
    order: VecDeque<u64>,
}

impl KvIndex {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            present: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    pub fn insert(&mut self, hashes: &[u64]) {
        for &h in hashes {
            if self.present.insert(h) {
                self.order.push_back(h);
            }
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.present.remove(&old);
            }
        }
    }

    /// Leading blocks of `hashes` this worker likely holds.
    pub fn prefix_overlap(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.present.contains(h))
            .count()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_over_prefixes() {
        let a = block_hashes(&[1, 2, 3, 4, 5], 2);
        let b = block_hashes(&[1, 2, 9, 4], 2);
        assert_eq!(a.len(), 2, "partial blocks are not hashed");
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        // Same block content after a different prefix hashes differently.
        assert_ne!(block_hashes(&[3, 4], 2)[0], a[1]);
    }

    #[test]
    fn overlap_counts_leading_blocks_and_evicts_oldest() {
        let mut idx = KvIndex::new(3);
        let h = block_hashes(&[1, 2, 3, 4, 5, 6], 2);
        idx.insert(&h[..2]);
        assert_eq!(idx.prefix_overlap(&h), 2);
        assert_eq!(idx.prefix_overlap(&h[1..]), 1);
        idx.insert(&[77, 78]);
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.prefix_overlap(&h), 0, "the oldest block was evicted");
    }
}
