//! Everything in one process: discovery, requests, notifications and queues on tokio channels.

use super::{
    response_stream, DiscoveryEvent, IncomingRequest, Instance, QueueAcker, QueueMessage,
    Registration, Responder, ResponseStream, Runtime,
};
use anyhow::{anyhow, Result};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Queue {
    messages: VecDeque<(Vec<u8>, u64)>,
    /// Taken and not yet acknowledged.
    in_flight: usize,
}

#[derive(Default)]
struct State {
    instances: BTreeMap<String, Vec<u8>>,
    watchers: Vec<mpsc::UnboundedSender<DiscoveryEvent>>,
    servers: HashMap<String, mpsc::Sender<IncomingRequest>>,
    subscribers: HashMap<String, Vec<mpsc::UnboundedSender<Vec<u8>>>>,
    queues: HashMap<String, Queue>,
}

/// The in-process runtime; clones share it.
#[derive(Clone, Default)]
pub struct LocalRuntime {
    state: Arc<Mutex<State>>,
    queue_signal: Arc<Notify>,
}

impl LocalRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    fn announce(state: &mut State, event: DiscoveryEvent) {
        state.watchers.retain(|w| w.send(event.clone()).is_ok());
    }
}

/// Hands a message back to the queue unless it was acknowledged.
struct LocalAcker {
    runtime: LocalRuntime,
    queue: String,
    message: Mutex<Option<(Vec<u8>, u64)>>,
    acked: AtomicBool,
}

impl QueueAcker for LocalAcker {
    fn ack(&self) -> BoxFuture<'static, Result<()>> {
        if !self.acked.swap(true, Ordering::SeqCst) {
            let mut state = self.runtime.state.lock();
            if let Some(q) = state.queues.get_mut(&self.queue) {
                q.in_flight -= 1;
            }
        }
        Box::pin(async { Ok(()) })
    }
    fn progress(&self) -> BoxFuture<'static, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

impl Drop for LocalAcker {
    fn drop(&mut self) {
        if self.acked.load(Ordering::SeqCst) {
            return;
        }
        if let Some(message) = self.message.lock().take() {
            let mut state = self.runtime.state.lock();
            let q = state.queues.entry(self.queue.clone()).or_default();
            q.in_flight -= 1;
            q.messages.push_front(message);
            drop(state);
            self.runtime.queue_signal.notify_waiters();
        }
    }
}

impl Runtime for LocalRuntime {
    fn register(&self, id: &str, info: Vec<u8>) -> BoxFuture<'_, Result<Registration>> {
        let id = id.to_string();
        Box::pin(async move {
            let mut state = self.state.lock();
            state.instances.insert(id.clone(), info.clone());
            Self::announce(
                &mut state,
                DiscoveryEvent::Up(Instance {
                    id: id.clone(),
                    info,
                }),
            );
            drop(state);
            let cancel = CancellationToken::new();
            let (this, token) = (self.clone(), cancel.clone());
            tokio::spawn(async move {
                token.cancelled().await;
                let mut state = this.state.lock();
                state.instances.remove(&id);
                Self::announce(&mut state, DiscoveryEvent::Down(id));
            });
            Ok(Registration::new(cancel))
        })
    }

    fn watch(&self) -> BoxFuture<'_, Result<BoxStream<'static, DiscoveryEvent>>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut state = self.state.lock();
            for (id, info) in &state.instances {
                let _ = tx.send(DiscoveryEvent::Up(Instance {
                    id: id.clone(),
                    info: info.clone(),
                }));
            }
            state.watchers.push(tx);
            Ok(UnboundedReceiverStream::new(rx).boxed())
        })
    }

    fn serve(&self, subject: &str) -> BoxFuture<'_, Result<BoxStream<'static, IncomingRequest>>> {
        let subject = subject.to_string();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(64);
            self.state.lock().servers.insert(subject, tx);
            Ok(ReceiverStream::new(rx).boxed())
        })
    }

    fn request(&self, subject: &str, payload: Vec<u8>) -> BoxFuture<'_, Result<ResponseStream>> {
        let subject = subject.to_string();
        Box::pin(async move {
            let server = self.state.lock().servers.get(&subject).cloned();
            let server = server.ok_or_else(|| anyhow!("nobody serves {subject}"))?;
            let (tx, rx) = mpsc::channel(64);
            let cancel = CancellationToken::new();
            let request = IncomingRequest {
                payload,
                responder: Responder::new(tx, cancel.clone()),
            };
            tokio::time::timeout(super::RESPONSE_IDLE_TIMEOUT, server.send(request))
                .await
                .map_err(|_| anyhow!("{subject} did not take the request in time"))?
                .map_err(|_| anyhow!("{subject} stopped serving"))?;
            // In one process a dead server closes the channel, so no idle timeout is needed.
            Ok(response_stream(rx, None, cancel))
        })
    }

    fn publish(&self, subject: &str, payload: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        let subject = subject.to_string();
        Box::pin(async move {
            if let Some(subs) = self.state.lock().subscribers.get_mut(&subject) {
                subs.retain(|s| s.send(payload.clone()).is_ok());
            }
            Ok(())
        })
    }

    fn subscribe(&self, subject: &str) -> BoxFuture<'_, Result<BoxStream<'static, Vec<u8>>>> {
        let subject = subject.to_string();
        Box::pin(async move {
            let (tx, rx) = mpsc::unbounded_channel();
            self.state
                .lock()
                .subscribers
                .entry(subject)
                .or_default()
                .push(tx);
            Ok(UnboundedReceiverStream::new(rx).boxed())
        })
    }

    fn queue_push(&self, queue: &str, payload: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        let queue = queue.to_string();
        Box::pin(async move {
            self.state
                .lock()
                .queues
                .entry(queue)
                .or_default()
                .messages
                .push_back((payload, 0));
            self.queue_signal.notify_waiters();
            Ok(())
        })
    }

    fn queue_pop(
        &self,
        queue: &str,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Option<QueueMessage>>> {
        let queue = queue.to_string();
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                // Register interest before looking, so a push in between is not missed.
                let signal = self.queue_signal.notified();
                let taken = {
                    let mut state = self.state.lock();
                    let q = state.queues.entry(queue.clone()).or_default();
                    q.messages.pop_front().inspect(|_| q.in_flight += 1)
                };
                if let Some((payload, delivered)) = taken {
                    let delivery = delivered + 1;
                    let acker = LocalAcker {
                        runtime: self.clone(),
                        queue: queue.clone(),
                        message: Mutex::new(Some((payload.clone(), delivery))),
                        acked: AtomicBool::new(false),
                    };
                    return Ok(Some(QueueMessage {
                        payload,
                        delivery,
                        acker: Box::new(acker),
                    }));
                }
                if tokio::time::timeout_at(deadline, signal).await.is_err() {
                    return Ok(None);
                }
            }
        })
    }

    fn queue_len(&self, queue: &str) -> BoxFuture<'_, Result<usize>> {
        let queue = queue.to_string();
        Box::pin(async move {
            let state = self.state.lock();
            Ok(state
                .queues
                .get(&queue)
                .map_or(0, |q| q.messages.len() + q.in_flight))
        })
    }
}
