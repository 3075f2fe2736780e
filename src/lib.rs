//! Tandem: disaggregated prefill/decode LLM serving with a built-in benchmark harness.
//!
//! Dependencies point one way: cli → frontend → worker → engine → kv → backend → model.
//! `runtime` (discovery and messaging) and `bench` (talks HTTP, or drives engines in-process)
//! sit beside them.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod engine;
pub mod frontend;
pub mod kv;
pub mod model;
pub mod runtime;
pub mod worker;
