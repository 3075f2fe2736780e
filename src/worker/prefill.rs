//! The prefill role: takes remote-prefill jobs from the queue, as many at once as its token budget
//! allows (the engine batches them into shared steps), computes each prompt, writes its KV into
//! the decode worker's blocks and notifies it. A job is acknowledged only after that, so the job
//! of a prefill worker that dies is delivered to another one.

use super::protocol::{kv_ready_subject, KvReady, RemotePrefillRequest, PREFILL_QUEUE};
use crate::engine::EngineHandle;
use crate::kv::transfer::{accepts_device, send_payload, KvTransfer};
use crate::runtime::{QueueMessage, Runtime};
use anyhow::{anyhow, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct PrefillConfig {
    /// Prompt tokens in flight at most (jobs are taken while below it; one job always fits).
    pub max_batched_tokens: usize,
    /// Longest a job may take from being taken to being acknowledged.
    pub job_timeout: Duration,
    /// How often a running job tells the queue it is still being worked on.
    pub progress_interval: Duration,
}

impl Default for PrefillConfig {
    fn default() -> Self {
        Self {
            max_batched_tokens: 8192,
            job_timeout: Duration::from_secs(120),
            progress_interval: Duration::from_secs(2),
        }
    }
}

pub struct PrefillWorker {
    pub id: String,
    pub engine: EngineHandle,
    pub runtime: Arc<dyn Runtime>,
    pub transfers: Vec<Arc<dyn KvTransfer>>,
    pub config: PrefillConfig,
}

impl PrefillWorker {
    /// Takes and runs jobs until `stop` fires; jobs still running then are left unacknowledged
    /// (they will be delivered again).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<usize>();
        let mut in_flight_tokens = 0usize;
        let mut in_flight_jobs = 0usize;
        while !stop.is_cancelled() {
            while let Ok(tokens) = done_rx.try_recv() {
                in_flight_tokens -= tokens;
                in_flight_jobs -= 1;
            }
            if in_flight_jobs > 0 && in_flight_tokens >= self.config.max_batched_tokens {
                tokio::select! {
                    Some(tokens) = done_rx.recv() => { in_flight_tokens -= tokens; in_flight_jobs -= 1; }
                    _ = stop.cancelled() => break,
                }
                continue;
            }
            // Wait long when idle; when busy, only a moment, so finished jobs are counted soon.
            let wait = if in_flight_jobs == 0 {
                Duration::from_millis(500)
            } else {
                Duration::from_millis(20)
            };
            let popped = tokio::select! {
                m = self.runtime.queue_pop(PREFILL_QUEUE, wait) => m,
                _ = stop.cancelled() => break,
            };
            let message = match popped {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("prefill queue: {e:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let job: RemotePrefillRequest = match serde_json::from_slice(&message.payload) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!("dropping a malformed prefill job: {e}");
                    let _ = message.ack().await;
                    continue;
                }
            };
            let tokens = job.request.prompt_tokens.len();
            in_flight_tokens += tokens;
            in_flight_jobs += 1;
            let (this, done, stop) = (self.clone(), done_tx.clone(), stop.clone());
            tokio::spawn(async move {
                this.handle(job, message, stop).await;
                let _ = done.send(tokens);
            });
        }
    }

    async fn handle(
        &self,
        job: RemotePrefillRequest,
        message: QueueMessage,
        stop: CancellationToken,
    ) {
        let id = job.request.id.clone();
        if job.ticket.expired() {
            // The decode worker has prefilled it itself by now (a notification would be ignored).
            tracing::info!(
                request = id,
                "dropping a prefill job its decode worker no longer waits for"
            );
            if let Err(e) = message.ack().await {
                tracing::warn!(request = id, "acknowledging the prefill job: {e:#}");
            }
            return;
        }
        if message.delivery > 1 {
            tracing::info!(
                request = id,
                delivery = message.delivery,
                "prefill job delivered again"
            );
        }
        let work = async {
            let mut progress = tokio::time::interval(self.config.progress_interval);
            progress.tick().await;
            let run = self.prefill_and_write(&job);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    result = &mut run => return result,
                    _ = progress.tick() => { let _ = message.progress().await; }
                }
            }
        };
        let result = tokio::select! {
            r = tokio::time::timeout(self.config.job_timeout, work) => r.unwrap_or_else(|_| Err(anyhow!("timed out"))),
            // Shutting down: leave it unacknowledged for another worker.
            _ = stop.cancelled() => return,
        };
        let note = KvReady {
            request_id: id.clone(),
            result: result.map_err(|e| format!("{e:#}")),
        };
        if let Err(why) = &note.result {
            tracing::warn!(request = id, "remote prefill failed: {why}");
        }
        let payload = serde_json::to_vec(&note).expect("serializable");
        if let Err(e) = self
            .runtime
            .publish(&kv_ready_subject(&job.decode_worker_id), payload)
            .await
        {
            // The decode worker falls back to a local prefill after its timeout.
            tracing::warn!(request = id, "notifying the decode worker: {e:#}");
        }
        if let Err(e) = message.ack().await {
            tracing::warn!(request = id, "acknowledging the prefill job: {e:#}");
        }
    }

    /// Computes the prompt and writes its KV into the decode worker's blocks; the first token.
    /// The KV stays on the GPU when the transfer hands it to a CUDA engine of this process as it is.
    async fn prefill_and_write(&self, job: &RemotePrefillRequest) -> Result<u32> {
        let on_device =
            self.engine.has_device_kv() && accepts_device(&self.transfers, &job.destination);
        let export = if on_device {
            self.engine
                .prefill_and_export_on_device(job.request.clone())
        } else {
            self.engine.prefill_and_export(job.request.clone())
        };
        let export = export.await.map_err(|e| anyhow!("prefill: {e}"))?;
        let (first_token, layout) = (export.first_token, export.layout);
        let payload = export.into_payload(job.ticket.num_cached_blocks);
        send_payload(
            &self.transfers,
            &job.destination,
            &job.request.id,
            job.ticket.blocks_to_write(),
            layout,
            payload,
        )
        .await?;
        Ok(first_token)
    }
}
