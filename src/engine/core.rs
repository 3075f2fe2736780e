//! The step loop, on its own OS thread: take commands, schedule, run the backend, sample, stream.

use crate::backend::{Backend, KvLayout};
use crate::engine::detokenize::TokenDecoder;
use crate::engine::device_kv::DeviceKvState;
use crate::engine::remote::{PrefillExport, RemotePrefillTicket};
use crate::engine::scheduler::Scheduler;
use crate::engine::sequence::{OutputSender, SeqId, SeqState, Sequence, Sink};
use crate::engine::step::InFlight;
use crate::engine::types::{EngineError, EngineMetrics, GenerateOutput, TokenLogprob};
use crate::kv::transfer::cuda::DeviceKv;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

pub enum Command {
    Add(Box<Sequence>),
    Cancel(SeqId),
    RemotePrefill(Box<Sequence>, Reply<RemotePrefillTicket>),
    /// A prefill-only request whose KV is wanted staged on the device (`Add` otherwise).
    AddDeviceExport(Box<Sequence>),
    ImportKv {
        request_id: String,
        block_ids: Vec<u32>,
        data: Vec<u8>,
        reply: Reply<()>,
    },
    ImportDeviceKv {
        request_id: String,
        block_ids: Vec<u32>,
        kv: Arc<DeviceKv>,
        from: usize,
        reply: Reply<()>,
    },
    CompleteRemote {
        request_id: String,
        first_token: u32,
        reply: Reply<()>,
    },
    FailRemote {
        request_id: String,
        reply: Reply<()>,
    },
    Shutdown,
}

/// State the handle reads without asking the step thread.
#[derive(Default)]
pub struct Shared {
    pub metrics: Mutex<EngineMetrics>,
    pub queued: Arc<AtomicUsize>,
    /// Set when the step thread has stopped; new requests are refused with this reason.
    pub stopped: Mutex<Option<String>>,
    /// The backend has device KV pools (it can stage exports and import device payloads).
    pub cuda_kv: std::sync::atomic::AtomicBool,
}

pub struct Core {
    pub backend: Box<dyn Backend>,
    pub sched: Scheduler,
    pub decoder: Option<Arc<dyn TokenDecoder>>,
    pub shared: Arc<Shared>,
    pub rx: Receiver<Command>,
    pub remote_prefill_timeout: Duration,
    pub parked: HashMap<String, SeqId>,
    pub layout: KvLayout,
    pub vocab_size: usize,
    pub steps: u64,
    pub last_step_ms: f64,
    /// (when, tokens generated) of recent steps, for tokens/s.
    pub recent: VecDeque<(Instant, usize)>,
    /// The last schedule found nothing runnable.
    pub stalled: bool,
    /// Outputs of this step, delivered by `publish_metrics`.
    pub outbox: Vec<(OutputSender, GenerateOutput)>,
    /// Copiers and device-export requests of the GPU KV path (`device_kv`).
    pub device_kv: DeviceKvState,
    /// Launch the next step before reading this one (`EngineConfig::async_scheduling`).
    pub async_scheduling: bool,
    /// The launched step not read yet (`step.rs`).
    pub(crate) in_flight: Option<InFlight>,
    pub last_finish: Option<Instant>,
}

impl Core {
    /// Runs until shutdown, until every handle and stream is gone, or until the backend fails.
    pub fn run(mut self) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop()));
        let reason = match result {
            Ok(Ok(())) => {
                tracing::info!("engine shut down");
                "engine shut down".to_string()
            }
            Ok(Err(reason)) => {
                tracing::error!("engine stopped: {reason}");
                reason
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                tracing::error!("engine step thread panicked: {msg}");
                format!("engine step thread panicked: {msg}")
            }
        };
        self.stop(reason);
    }

    fn stop(&mut self, reason: String) {
        // Free every block and publish that before anyone hears of the failure.
        let ids: Vec<SeqId> = self.sched.seqs.keys().copied().collect();
        let removed: Vec<Sequence> = ids
            .into_iter()
            .filter_map(|id| self.sched.remove(id))
            .collect();
        self.parked.clear();
        self.publish_metrics(0);
        *self.shared.stopped.lock() = Some(reason.clone());
        for mut seq in removed {
            seq.sink.fail(EngineError::Internal(reason.clone()));
        }
    }

    fn run_loop(&mut self) -> Result<(), String> {
        loop {
            if !self.take_commands()? {
                return Ok(());
            }
            self.expire_parked();
            self.reap_cancelled();
            if self.in_flight.as_ref().is_some_and(|s| s.has_logits) {
                self.drain()?;
            }
            let scheduled = self.sched.schedule();
            let launched = match scheduled.is_empty() {
                true => None,
                false => Some(self.launch(&scheduled)?),
            };
            // The device computes the new step while the host reads the one before.
            let previous = std::mem::replace(&mut self.in_flight, launched);
            let finished = previous.is_some();
            let mut generated = match previous {
                Some(step) => self.finish(step)?,
                None => 0,
            };
            if !self.async_scheduling {
                if let Some(step) = self.in_flight.take() {
                    generated += self.finish(step)?;
                }
            }
            // Work that cannot run now (its blocks are held by parked sequences) waits for a
            // command or a timeout instead of spinning.
            self.stalled = scheduled.is_empty() && !finished;
            self.publish_metrics(generated);
            if cfg!(debug_assertions) {
                self.sched.check_invariants();
            }
        }
    }

    /// Applies queued commands; blocks while there is nothing to run. `Ok(false)` = stop.
    fn take_commands(&mut self) -> Result<bool, String> {
        if (!self.sched.has_work() || self.stalled) && self.in_flight.is_none() {
            let idle_wait = if self.stalled {
                Duration::from_millis(5)
            } else {
                Duration::from_secs(1)
            };
            let wait = self.next_deadline().map_or(idle_wait, |d| {
                d.saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(1), idle_wait)
            });
            match self.rx.recv_timeout(wait) {
                Ok(cmd) => {
                    if !self.apply(cmd)? {
                        return Ok(false);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(false),
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => {
                    if !self.apply(cmd)? {
                        return Ok(false);
                    }
                }
                Err(TryRecvError::Empty) => return Ok(true),
                Err(TryRecvError::Disconnected) => {
                    return Ok(self.sched.has_work() || !self.parked.is_empty())
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.parked
            .values()
            .filter_map(|id| match self.sched.seqs.get(id)?.state {
                SeqState::Parked { deadline } => Some(deadline),
                _ => None,
            })
            .min()
    }

    /// Applies a command; `Ok(false)` = shut down.
    fn apply(&mut self, cmd: Command) -> Result<bool, String> {
        if matches!(
            cmd,
            Command::ImportKv { .. } | Command::ImportDeviceKv { .. }
        ) {
            // Its blocks may have been freed by a sequence that a launched step still writes;
            // an import is not ordered behind that step on the device.
            self.drain()?;
        }
        match cmd {
            Command::Add(mut seq) => {
                seq.counted_in_queue = true;
                self.sched.insert(*seq);
            }
            Command::AddDeviceExport(seq) => {
                self.device_kv.exports.insert(seq.id);
                return self.apply(Command::Add(seq));
            }
            Command::Cancel(id) => {
                self.device_kv.exports.remove(&id);
                if let Some(seq) = self.sched.remove(id) {
                    self.parked.remove(&seq.request_id);
                }
            }
            Command::RemotePrefill(seq, reply) => self.park(*seq, reply),
            Command::ImportKv {
                request_id,
                block_ids,
                data,
                reply,
            } => {
                let _ = reply.send(self.import_kv(&request_id, &block_ids, &data));
            }
            Command::ImportDeviceKv {
                request_id,
                block_ids,
                kv,
                from,
                reply,
            } => {
                let result = self.import_kv_device(&request_id, &block_ids, &kv, from);
                // This thread's reference goes before the reply, so the staging buffer is
                // released (on a thread of its own) as soon as the sender lets go too.
                drop(kv);
                let _ = reply.send(result);
            }
            Command::CompleteRemote {
                request_id,
                first_token,
                reply,
            } => self.complete_remote(&request_id, first_token, reply),
            Command::FailRemote { request_id, reply } => {
                let _ = reply.send(self.fail_remote(&request_id));
            }
            Command::Shutdown => return Ok(false),
        }
        Ok(true)
    }

    /// Drops sequences whose client went away (a Cancel command may still be on its way).
    fn reap_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .sched
            .seqs
            .values()
            .filter(|s| s.sink.is_closed())
            .map(|s| s.id)
            .collect();
        for id in gone {
            self.device_kv.exports.remove(&id);
            if let Some(seq) = self.sched.remove(id) {
                self.parked.remove(&seq.request_id);
            }
        }
    }

    /// A new token: the answer of a prefill-only request, or the next token of a stream.
    pub(crate) fn on_token(&mut self, id: SeqId, token: u32, logprob: Option<TokenLogprob>) {
        let seq = self.sched.seqs.get_mut(&id).expect("live sequence");
        if let Sink::Export(_) = seq.sink {
            let (blocks, prompt_tokens, cached_tokens) =
                (seq.blocks.clone(), seq.prompt_len, seq.cached_tokens);
            let device = if self.device_kv.exports.remove(&id) {
                self.stage_on_device(&blocks)
            } else {
                None
            };
            let kv = match device {
                Some(_) => Ok(vec![]),
                None => self.backend.export_blocks(&blocks),
            };
            let result = kv
                .map(|kv| PrefillExport {
                    first_token: token,
                    kv,
                    device,
                    num_blocks: blocks.len(),
                    layout: self.layout,
                    prompt_tokens,
                    cached_tokens,
                })
                .map_err(|e| EngineError::Internal(format!("KV export failed: {e:#}")));
            let mut seq = self.sched.remove(id).expect("live sequence");
            seq.sink.send_export(result);
            return;
        }
        self.emit_token(id, token, logprob)
    }
}
