//! Names of full KV blocks: a hash chain over their tokens.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Hash of one full block given its parent's hash (0 for the first block).
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(&bytes, parent)
}

/// The hash chain of the full blocks of `tokens` (a trailing partial block gets no hash).
/// Block `i`'s hash depends on every token of blocks `0..=i`, so equal hashes mean equal prefixes.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    assert!(block_size > 0, "block_size must be positive");
    let mut parent = 0u64;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            parent = block_hash(parent, block);
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_the_whole_prefix() {
        let a = block_hashes(&[1, 2, 3, 4, 5, 6, 7], 2);
        assert_eq!(a.len(), 3);
        let b = block_hashes(&[1, 2, 3, 4, 5, 6], 2);
        assert_eq!(a, b);
        // Same second block, different first block: the second hash differs too.
        let c = block_hashes(&[9, 2, 3, 4], 2);
        assert_ne!(a[1], c[1]);
        assert_eq!(block_hashes(&[1], 2), Vec::<u64>::new());
    }

    #[test]
    fn hashes_are_stable_across_processes() {
        // xxh3 is a fixed function: this value must never change, routers in other processes
        // compute it too.
        let h = block_hashes(&[1, 2], 2)[0];
        assert_eq!(h, block_hash(0, &[1, 2]));
        assert_eq!(h, xxh3_64_with_seed(&[1, 0, 0, 0, 2, 0, 0, 0], 0));
    }
}
