//! The paged KV cache's bookkeeping: a fixed pool of blocks, reference counts, and a prefix cache
//! that shares full blocks between sequences with the same prefix.
//!
//! A full block is named by a hash chain over its tokens (xxh3, stable across processes and
//! machines), so a router can compute the same names from a prompt for KV-aware routing. Only
//! full blocks are ever named and shared; the block a sequence is still writing into (its last,
//! partial block) stays private.
//!
//! `transfer` moves blocks between workers (disaggregated prefill/decode).

pub mod block_pool;
pub mod prefix;
pub mod transfer;

pub use block_pool::{BlockPool, PoolStats};
pub use prefix::block_hashes;
