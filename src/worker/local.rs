//! A worker in this process: a `WorkerClient` over an `EngineHandle`.

use crate::engine::types::{EngineError, EngineMetrics, GenerateRequest};
use crate::engine::EngineHandle;
use crate::worker::{OutputStream, WorkerClient};
use futures::future::BoxFuture;

#[derive(Clone)]
pub struct LocalWorker {
    id: String,
    engine: EngineHandle,
}

impl LocalWorker {
    pub fn new(id: impl Into<String>, engine: EngineHandle) -> Self {
        Self {
            id: id.into(),
            engine,
        }
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }
}

impl WorkerClient for LocalWorker {
    fn id(&self) -> &str {
        &self.id
    }

    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<OutputStream, EngineError>> {
        let started = self.engine.generate(req);
        Box::pin(async move { started })
    }

    fn metrics(&self) -> EngineMetrics {
        self.engine.metrics()
    }
}
