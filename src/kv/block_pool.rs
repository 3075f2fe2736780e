//! A fixed pool of KV blocks with reference counts and an LRU prefix cache.
//!
//! Every block is either *active* (reference count > 0, held by one or more sequences) or *free*.
//! A free block may still carry a hash (its content is a cached prefix): it can be revived by a
//! later sequence with the same prefix until it is evicted, least recently freed first, to serve
//! a new allocation. Free blocks without a hash are handed out before any cached one.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub total: usize,
    pub active: usize,
    pub free: usize,
    /// Blocks whose content is named by a hash (active or free).
    pub cached: usize,
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub queried_tokens: u64,
    pub hit_tokens: u64,
}

impl PoolStats {
    pub fn hit_rate(&self) -> f64 {
        if self.queried_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.queried_tokens as f64
        }
    }
}

#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    enable_prefix_caching: bool,
    ref_counts: Vec<u32>,
    hashes: Vec<Option<u64>>,
    cached: HashMap<u64, u32>,
    /// Free blocks by eviction order (smallest key first), and each free block's key.
    free: BTreeMap<i64, u32>,
    free_key: Vec<Option<i64>>,
    next_back: i64,
    next_front: i64,
    queried_tokens: u64,
    hit_tokens: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        let mut pool = Self {
            block_size,
            enable_prefix_caching,
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            cached: HashMap::new(),
            free: BTreeMap::new(),
            free_key: vec![None; num_blocks],
            next_back: 0,
            next_front: -1,
            queried_tokens: 0,
            hit_tokens: 0,
        };
        for b in 0..num_blocks as u32 {
            pool.push_free(b);
        }
        pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn prefix_caching(&self) -> bool {
        self.enable_prefix_caching
    }

    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// The cached blocks holding the longest prefix named by `hashes` (no references taken).
    pub fn lookup(&self, hashes: &[u64]) -> Vec<u32> {
        if !self.enable_prefix_caching {
            return vec![];
        }
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// Whether `new_blocks` fresh blocks can be allocated after reviving the `hits`.
    pub fn can_allocate(&self, new_blocks: usize, hits: &[u32]) -> bool {
        let revived = hits.iter().filter(|&&b| self.ref_count(b) == 0).count();
        self.num_free() >= revived + new_blocks
    }

    /// Takes a reference on cached blocks found by `lookup`.
    pub fn acquire(&mut self, blocks: &[u32]) {
        for &b in blocks {
            if self.ref_counts[b as usize] == 0 {
                let key = self.free_key[b as usize]
                    .take()
                    .expect("free block without key");
                self.free.remove(&key);
            }
            self.ref_counts[b as usize] += 1;
        }
    }

    /// Counts a prefix-cache lookup for the hit rate.
    pub fn record_lookup(&mut self, queried_tokens: usize, hit_tokens: usize) {
        self.queried_tokens += queried_tokens as u64;
        self.hit_tokens += hit_tokens as u64;
    }

    /// `n` fresh blocks (reference count 1), or `None` (and nothing taken) when too few are free.
    /// Evicts cached free blocks, least recently freed first.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if self.free.len() < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, b) = self.free.pop_first().expect("counted above");
            self.free_key[b as usize] = None;
            if let Some(h) = self.hashes[b as usize].take() {
                self.cached.remove(&h);
            }
            self.ref_counts[b as usize] = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Drops one reference on each block. Pass a sequence's table in order: the tail is freed
    /// last and so evicted first, keeping the more shareable head cached longer.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let rc = &mut self.ref_counts[b as usize];
            assert!(*rc > 0, "double free of KV block {b}");
            *rc -= 1;
            if *rc == 0 {
                self.push_free(b);
            }
        }
    }

    /// Names a full, written block by its hash so later sequences can share it. A block whose
    /// content is already cached elsewhere stays unnamed (it is freed normally).
    pub fn commit(&mut self, block: u32, hash: u64) {
        if !self.enable_prefix_caching || self.hashes[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            self.hashes[block as usize] = Some(hash);
        }
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            total: self.num_blocks(),
            active: self.num_blocks() - self.num_free(),
            free: self.num_free(),
            cached: self.cached.len(),
            queried_tokens: self.queried_tokens,
            hit_tokens: self.hit_tokens,
        }
    }

    /// Panics when the pool's own books disagree (tests call it after every step).
    pub fn check_invariants(&self) {
        for (b, rc) in self.ref_counts.iter().enumerate() {
            assert_eq!(
                *rc == 0,
                self.free_key[b].is_some(),
                "block {b}: rc {rc} vs free list"
            );
            if let Some(h) = self.hashes[b] {
                assert_eq!(
                    self.cached.get(&h),
                    Some(&(b as u32)),
                    "block {b}: hash map"
                );
            }
        }
        assert_eq!(self.free.len(), self.free_key.iter().flatten().count());
    }

    fn push_free(&mut self, b: u32) {
        // Unnamed blocks go to the front (reused first); named ones to the back (LRU).
        let key = if self.hashes[b as usize].is_some() {
            self.next_back += 1;
            self.next_back
        } else {
            self.next_front -= 1;
            self.next_front
        };
        self.free.insert(key, b);
        self.free_key[b as usize] = Some(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut pool = BlockPool::new(4, 2, true);
        let a = pool.allocate(3).unwrap();
        assert_eq!(pool.num_free(), 1);
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.num_free(), 1);
        pool.release(&a);
        assert_eq!(pool.num_free(), 4);
        pool.check_invariants();
    }

    #[test]
    fn cached_blocks_are_revived_and_evicted_lru() {
        let mut pool = BlockPool::new(3, 2, true);
        let a = pool.allocate(1).unwrap();
        let b = pool.allocate(1).unwrap();
        pool.commit(a[0], 11);
        pool.commit(b[0], 22);
        pool.release(&a); // freed first: evicted first
        pool.release(&b);
        assert_eq!(pool.lookup(&[11]), a);
        // The unnamed free block goes first, then the least recently freed cached one (a).
        let c = pool.allocate(2).unwrap();
        assert!(!c.contains(&b[0]));
        assert!(c.contains(&a[0]));
        assert!(pool.lookup(&[11]).is_empty());
        assert_eq!(pool.lookup(&[22]), b);
        assert!(pool.can_allocate(0, &b));
        assert!(!pool.can_allocate(1, &b));
        pool.acquire(&b);
        assert_eq!(pool.ref_count(b[0]), 1);
        assert_eq!(pool.num_free(), 0);
        pool.check_invariants();
    }

    #[test]
    fn disabled_cache_never_hits_and_duplicates_stay_unnamed() {
        let mut off = BlockPool::new(2, 2, false);
        let a = off.allocate(1).unwrap();
        off.commit(a[0], 5);
        assert!(off.lookup(&[5]).is_empty());

        let mut on = BlockPool::new(2, 2, true);
        let x = on.allocate(2).unwrap();
        on.commit(x[0], 5);
        on.commit(x[1], 5);
        assert_eq!(on.lookup(&[5]), vec![x[0]]);
        assert_eq!(on.stats().cached, 1);
        on.release(&x);
        on.check_invariants();
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut pool = BlockPool::new(1, 2, true);
        let a = pool.allocate(1).unwrap();
        pool.release(&a);
        pool.release(&a);
    }
}
