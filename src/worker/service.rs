//! Puts a worker on the runtime: registers it in discovery, answers `generate` requests on its
//! subject (one response chunk per output piece) and publishes its load.

use super::protocol::{generate_subject, metrics_subject, WorkerInfo};
use super::WorkerClient;
use crate::engine::types::{EngineError, EngineMetrics, GenerateOutput, GenerateRequest};
use crate::runtime::{IncomingRequest, Registration, Runtime};
use anyhow::Result;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// One response chunk: a piece of output or the error that ends the request.
pub type Chunk = Result<GenerateOutput, EngineError>;

/// How often a worker publishes its metrics.
pub const METRICS_INTERVAL: Duration = Duration::from_millis(250);

/// A served worker; dropping it stops serving and deregisters.
pub struct WorkerService {
    _registration: Registration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for WorkerService {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

pub async fn serve_worker(
    runtime: Arc<dyn Runtime>,
    worker: Arc<dyn WorkerClient>,
    info: &WorkerInfo,
) -> Result<WorkerService> {
    let id = worker.id().to_string();
    let mut incoming = runtime.serve(&generate_subject(&id)).await?;
    let w = worker.clone();
    let serving = tokio::spawn(async move {
        while let Some(request) = incoming.next().await {
            tokio::spawn(answer(w.clone(), request));
        }
    });
    let w = worker.clone();
    let publishing = publish_metrics(runtime.clone(), &id, move || w.metrics());
    // Register last: once listed, the worker answers.
    let registration = runtime.register(&id, serde_json::to_vec(info)?).await?;
    Ok(WorkerService {
        _registration: registration,
        tasks: vec![serving, publishing],
    })
}

/// Publishes `metrics()` on the worker's metrics subject every [`METRICS_INTERVAL`].
pub fn publish_metrics(
    runtime: Arc<dyn Runtime>,
    id: &str,
    metrics: impl Fn() -> EngineMetrics + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let subject = metrics_subject(id);
    tokio::spawn(async move {
        loop {
            let snapshot = serde_json::to_vec(&metrics()).expect("serializable");
            let _ = runtime.publish(&subject, snapshot).await;
            tokio::time::sleep(METRICS_INTERVAL).await;
        }
    })
}

async fn answer(worker: Arc<dyn WorkerClient>, request: IncomingRequest) {
    let responder = request.responder;
    let req: GenerateRequest = match serde_json::from_slice(&request.payload) {
        Ok(r) => r,
        Err(e) => {
            let chunk: Chunk = Err(EngineError::InvalidRequest(format!(
                "malformed request: {e}"
            )));
            let _ = responder
                .send(serde_json::to_vec(&chunk).expect("serializable"))
                .await;
            return responder.end().await;
        }
    };
    let cancelled = responder.cancellation();
    let started = tokio::select! {
        s = worker.generate(req) => s,
        _ = cancelled.cancelled() => return,
    };
    let mut stream = match started {
        Ok(s) => s,
        Err(e) => {
            let chunk: Chunk = Err(e);
            let _ = responder
                .send(serde_json::to_vec(&chunk).expect("serializable"))
                .await;
            return responder.end().await;
        }
    };
    loop {
        // A client that goes away drops the stream here, which cancels the request.
        let item = tokio::select! {
            item = stream.next() => item,
            _ = cancelled.cancelled() => return,
        };
        let Some(item) = item else { break };
        let last = item.as_ref().map_or(true, |o| o.finish_reason.is_some());
        if responder
            .send(serde_json::to_vec(&item).expect("serializable"))
            .await
            .is_err()
        {
            return;
        }
        if last {
            break;
        }
    }
    responder.end().await;
}
