//! The benchmark harness: the guide's concurrency sweep against an OpenAI endpoint (or engines
//! in this process), genai-perf's metrics and artifacts, Pareto frontiers, the vLLM baseline
//! launcher with its least-connections balancer, and `tandem demo`.

pub mod artifacts;
pub mod balancer;
pub mod client;
pub mod demo;
pub mod inprocess;
pub mod launcher;
pub mod metrics;
pub mod mock_server;
pub mod pareto;
pub mod plot;
pub mod prompts;
pub mod report;
pub mod sweep;
pub mod target;

pub use artifacts::DeploymentConfig;
pub use metrics::{LevelMetrics, RequestRecord, Stats};
pub use sweep::{run_sweep, LevelResult, SweepConfig};
pub use target::{Chunk, ChunkStream, LoadTarget};
