//! The router's estimate of what one worker holds in its prefix cache: the block hashes of the
//! prompts routed to it, oldest forgotten first.

use std::collections::{HashSet, VecDeque};

pub use crate::kv::block_hashes;

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
