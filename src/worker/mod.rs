//! Workers own an engine and play a role (agg, prefill, decode). The frontend and router reach
//! every worker, in-process or remote, through `WorkerClient`.

use crate::engine::types::{EngineError, EngineMetrics, GenerateOutput, GenerateRequest};
use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub type OutputStream = BoxStream<'static, Result<GenerateOutput, EngineError>>;

pub trait WorkerClient: Send + Sync {
    fn id(&self) -> &str;
    /// Starts a request. Dropping the returned stream cancels it and frees its KV blocks.
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<OutputStream, EngineError>>;
    /// Latest load snapshot, for routing and `/metrics`.
    fn metrics(&self) -> EngineMetrics;
}

pub mod local;
pub use local::LocalWorker;

pub mod decode;
pub mod deployment;
pub mod prefill;
pub mod protocol;
pub mod remote;
pub mod service;
