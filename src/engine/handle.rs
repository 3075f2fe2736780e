//! `EngineHandle`: the thread-safe front of an engine. Validates requests at once, sends them to
//! the step thread, and turns its answers into streams that cancel their request when dropped.

use crate::engine::core::{Command, Shared};
use crate::engine::remote::{PrefillExport, RemotePrefillTicket};
use crate::engine::sampler::SeqSampler;
use crate::engine::sequence::{SeqId, Sequence, Sink};
use crate::engine::types::{EngineError, EngineMetrics, GenerateOutput, GenerateRequest};
use crate::kv::transfer::cuda::DeviceKv;
use crate::worker::OutputStream;
use futures::future::BoxFuture;
use futures::Stream;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot};

/// What validation needs to know about the engine.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_model_len: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub vocab_size: usize,
    pub max_queue_len: usize,
    pub has_tokenizer: bool,
    pub eos_token_ids: Vec<u32>,
    /// The backend's KV layout (what `import_kv` expects and `prefill_and_export` gives).
    pub kv_layout: crate::backend::KvLayout,
}

#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Sender<Command>,
    shared: Arc<Shared>,
    limits: Limits,
    next_id: AtomicU64,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl EngineHandle {
    pub(crate) fn new(
        tx: Sender<Command>,
        shared: Arc<Shared>,
        limits: Limits,
        thread: std::thread::JoinHandle<()>,
    ) -> Self {
        let inner = Inner {
            tx,
            shared,
            limits,
            next_id: AtomicU64::new(1),
            thread: parking_lot::Mutex::new(Some(thread)),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Latest snapshot, updated by the step thread every step.
    pub fn metrics(&self) -> EngineMetrics {
        self.inner.shared.metrics.lock().clone()
    }

    /// Starts a request: validation errors come back at once, everything later on the stream.
    /// Dropping the stream cancels the request and frees its KV blocks.
    pub fn generate(&self, req: GenerateRequest) -> Result<OutputStream, EngineError> {
        let (seq, rx) = self.new_stream_seq(req)?;
        let guard = self.enqueue(Command::Add(Box::new(seq.0)), seq.1)?;
        Ok(Box::pin(SeqStream {
            rx,
            guard,
            done: false,
        }))
    }

    /// Prefill side of disaggregation: runs only the prompt (batched with other work under the
    /// token budget), returns the first token and the prompt's KV blocks, and frees them.
    /// Dropping the future cancels it.
    pub fn prefill_and_export(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<PrefillExport, EngineError>> {
        self.export(req, false)
    }

    fn export(
        &self,
        req: GenerateRequest,
        on_device: bool,
    ) -> BoxFuture<'static, Result<PrefillExport, EngineError>> {
        let started = self.validate(&req).and_then(|()| {
            let (tx, rx) = oneshot::channel();
            let seq = Box::new(self.new_seq(req, Sink::Export(Some(tx))));
            let id = seq.id;
            let cmd = if on_device {
                Command::AddDeviceExport(seq)
            } else {
                Command::Add(seq)
            };
            let guard = self.enqueue(cmd, id)?;
            Ok((rx, guard))
        });
        Box::pin(async move {
            let (rx, mut guard) = started?;
            let result = rx.await.unwrap_or_else(|_| Err(stopped_early()));
            guard.done = true;
            result
        })
    }

    /// `prefill_and_export`, the blocks staged on this engine's GPU instead of copied to the host
    /// (`PrefillExport::device`; host bytes when the backend has no device pool or staging fails).
    /// For a decode engine of this process that can `import_kv_device`.
    pub fn prefill_and_export_on_device(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<PrefillExport, EngineError>> {
        self.export(req, true)
    }

    /// Whether the backend keeps its KV in device pools (`import_kv_device` copies GPU to GPU).
    pub fn has_device_kv(&self) -> bool {
        self.inner.shared.cuda_kv.load(Ordering::Relaxed)
    }

    /// Decode side of disaggregation: allocates KV blocks for the prompt and parks the request
    /// until `complete_remote_prefill` (or `fail_remote_prefill`, or the timeout: then it is
    /// prefilled locally). The stream yields tokens from the first one on.
    pub async fn generate_remote_prefill(
        &self,
        req: GenerateRequest,
    ) -> Result<(RemotePrefillTicket, OutputStream), EngineError> {
        let ((seq, id), rx) = self.new_stream_seq(req)?;
        let (reply_tx, reply_rx) = oneshot::channel();
        let guard = self.send(Command::RemotePrefill(Box::new(seq), reply_tx), id)?;
        let ticket = reply_rx.await.unwrap_or_else(|_| Err(stopped_early()))?;
        Ok((
            ticket,
            Box::pin(SeqStream {
                rx,
                guard,
                done: false,
            }),
        ))
    }

    /// Writes transferred KV (in `Backend::export_blocks` format) into blocks of a parked request.
    pub async fn import_kv(
        &self,
        request_id: &str,
        block_ids: Vec<u32>,
        data: Vec<u8>,
    ) -> Result<(), EngineError> {
        let request_id = request_id.to_string();
        self.call(|reply| Command::ImportKv {
            request_id,
            block_ids,
            data,
            reply,
        })
        .await
    }

    /// Copies staged device KV (blocks `from..` of `kv`) into blocks of a parked request, GPU to
    /// GPU on the step thread (through the host when this backend has no device pool).
    pub async fn import_kv_device(
        &self,
        request_id: &str,
        block_ids: Vec<u32>,
        kv: Arc<DeviceKv>,
        from: usize,
    ) -> Result<(), EngineError> {
        let request_id = request_id.to_string();
        self.call(|reply| Command::ImportDeviceKv {
            request_id,
            block_ids,
            kv,
            from,
            reply,
        })
        .await
    }

    /// The remote prefill wrote every block: start decoding with its first token.
    pub async fn complete_remote_prefill(
        &self,
        request_id: &str,
        first_token: u32,
    ) -> Result<(), EngineError> {
        let request_id = request_id.to_string();
        self.call(|reply| Command::CompleteRemote {
            request_id,
            first_token,
            reply,
        })
        .await
    }

    /// The remote prefill failed: free the parked blocks and prefill locally.
    pub async fn fail_remote_prefill(&self, request_id: &str) -> Result<(), EngineError> {
        let request_id = request_id.to_string();
        self.call(|reply| Command::FailRemote { request_id, reply })
            .await
    }

    /// Stops the step thread; live requests end with an error. Waits for the thread to exit.
    pub fn shutdown(&self) {
        let _ = self.inner.tx.send(Command::Shutdown);
        if let Some(t) = self.inner.thread.lock().take() {
            let _ = t.join();
        }
    }

    async fn call(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), EngineError>>) -> Command,
    ) -> Result<(), EngineError> {
        self.check_running()?;
        let (tx, rx) = oneshot::channel();
        self.inner.tx.send(make(tx)).map_err(|_| stopped_early())?;
        rx.await.unwrap_or_else(|_| Err(stopped_early()))
    }

    fn check_running(&self) -> Result<(), EngineError> {
        match &*self.inner.shared.stopped.lock() {
            Some(reason) => Err(EngineError::Internal(format!("engine stopped: {reason}"))),
            None => Ok(()),
        }
    }

    #[allow(clippy::type_complexity)]
    fn new_stream_seq(
        &self,
        req: GenerateRequest,
    ) -> Result<
        (
            (Sequence, SeqId),
            mpsc::UnboundedReceiver<Result<GenerateOutput, EngineError>>,
        ),
        EngineError,
    > {
        self.validate(&req)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let seq = self.new_seq(req, Sink::Stream(tx));
        let id = seq.id;
        Ok(((seq, id), rx))
    }

    fn new_seq(&self, req: GenerateRequest, sink: Sink) -> Sequence {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let sampler = SeqSampler::new(&req.params, &self.inner.limits.eos_token_ids);
        Sequence::new(id, req, sampler, self.inner.limits.has_tokenizer, sink)
    }

    /// Counts the request in the queue (refusing it when full) and sends it.
    fn enqueue(&self, cmd: Command, id: SeqId) -> Result<CancelGuard, EngineError> {
        let max = self.inner.limits.max_queue_len;
        let queued = &self.inner.shared.queued;
        let before = queued.fetch_add(1, Ordering::Relaxed);
        if before >= max {
            queued.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::QueueFull(before));
        }
        self.send(cmd, id).inspect_err(|_| {
            queued.fetch_sub(1, Ordering::Relaxed);
        })
    }

    fn send(&self, cmd: Command, id: SeqId) -> Result<CancelGuard, EngineError> {
        self.check_running()?;
        self.inner.tx.send(cmd).map_err(|_| stopped_early())?;
        Ok(CancelGuard {
            tx: self.inner.tx.clone(),
            id,
            done: false,
        })
    }

    fn validate(&self, req: &GenerateRequest) -> Result<(), EngineError> {
        self.check_running()?;
        super::validate::validate(req, &self.inner.limits)
    }
}

fn stopped_early() -> EngineError {
    EngineError::Internal("the engine stopped before finishing the request".into())
}

/// Tells the step thread to drop a request whose receiver went away before it finished.
struct CancelGuard {
    tx: Sender<Command>,
    id: SeqId,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send(Command::Cancel(self.id));
        }
    }
}

struct SeqStream {
    rx: mpsc::UnboundedReceiver<Result<GenerateOutput, EngineError>>,
    guard: CancelGuard,
    done: bool,
}

impl Stream for SeqStream {
    type Item = Result<GenerateOutput, EngineError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                if item.as_ref().map_or(true, |o| o.finish_reason.is_some()) {
                    self.done = true;
                    self.guard.done = true;
                }
                Poll::Ready(Some(item))
            }
            // The step thread dropped the sender without a last piece: it died.
            Poll::Ready(None) => {
                self.done = true;
                self.guard.done = true;
                Poll::Ready(Some(Err(stopped_early())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

// Frontends and routers share one handle across tasks and threads.
const _: fn() = || {
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
    assert_shareable::<EngineHandle>();
};
