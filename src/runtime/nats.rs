//! Requests, notifications and work queues over NATS (the queue on JetStream).
//!
//! A request is published with a fresh inbox as its reply subject; the server streams
//! [`Frame`]s back to the inbox, with a heartbeat every second, and listens on `<inbox>.cancel`
//! for the client giving up. A client that hears nothing for [`RESPONSE_IDLE_TIMEOUT`] (no
//! server, or a dead one) gets an error.

use super::{
    response_stream, sanitize, Frame, IncomingRequest, QueueAcker, QueueMessage, Responder,
    ResponseStream, HEARTBEAT_INTERVAL, RESPONSE_IDLE_TIMEOUT,
};
use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const OP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct NatsMessaging {
    client: async_nats::Client,
    js: jetstream::Context,
    namespace: String,
    ack_wait: Duration,
    queues:
        Arc<Mutex<HashMap<String, (jetstream::stream::Stream, jetstream::consumer::PullConsumer)>>>,
}

impl NatsMessaging {
    /// Connects to `url`; reconnects by itself forever after a server restart.
    pub async fn connect(url: &str, namespace: &str, ack_wait: Duration) -> Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(OP_TIMEOUT)
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(1000))
            })
            .event_callback(|event| async move { tracing::info!("NATS: {event}") })
            .connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(OP_TIMEOUT);
        Ok(Self {
            client,
            js,
            namespace: sanitize(namespace),
            ack_wait,
            queues: Default::default(),
        })
    }

    fn subject(&self, name: &str) -> String {
        format!("tandem.{}.{}", self.namespace, name)
    }

    pub async fn serve(&self, subject: &str) -> Result<BoxStream<'static, IncomingRequest>> {
        let mut sub = self.client.subscribe(self.subject(subject)).await?;
        let client = self.client.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(reply) = msg.reply.clone() else {
                    continue;
                };
                let (frames_tx, frames_rx) = mpsc::channel(64);
                let cancel = CancellationToken::new();
                tokio::spawn(pump_response(
                    client.clone(),
                    reply.to_string(),
                    frames_rx,
                    cancel.clone(),
                ));
                let request = IncomingRequest {
                    payload: msg.payload.to_vec(),
                    responder: Responder::new(frames_tx, cancel),
                };
                if tx.send(request).await.is_err() {
                    break; // the server stopped serving
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }

    pub async fn request(&self, subject: &str, payload: Vec<u8>) -> Result<ResponseStream> {
        let inbox = self.client.new_inbox();
        let mut sub = self.client.subscribe(inbox.clone()).await?;
        self.client
            .publish_with_reply(self.subject(subject), inbox.clone(), payload.into())
            .await?;
        let (tx, rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let (client, token) = (self.client.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = sub.next() => {
                        let Some(msg) = msg else { break };
                        let frame = Frame::decode(&msg.payload).unwrap_or_else(|e| Frame::Error(e.to_string()));
                        let last = matches!(frame, Frame::End | Frame::Error(_));
                        if tx.send(frame).await.is_err() || last {
                            break;
                        }
                    }
                    _ = token.cancelled() => {
                        let _ = client.publish(format!("{inbox}.cancel"), Vec::new().into()).await;
                        break;
                    }
                }
            }
        });
        Ok(response_stream(rx, Some(RESPONSE_IDLE_TIMEOUT), cancel))
    }

    pub async fn publish(&self, subject: &str, payload: Vec<u8>) -> Result<()> {
        self.client
            .publish(self.subject(subject), payload.into())
            .await?;
        Ok(())
    }

    pub async fn subscribe(&self, subject: &str) -> Result<BoxStream<'static, Vec<u8>>> {
        let sub = self.client.subscribe(self.subject(subject)).await?;
        Ok(sub.map(|m| m.payload.to_vec()).boxed())
    }

    /// The JetStream stream and durable consumer behind `queue`, created on first use.
    async fn queue(
        &self,
        queue: &str,
    ) -> Result<(jetstream::stream::Stream, jetstream::consumer::PullConsumer)> {
        if let Some(q) = self.queues.lock().get(queue).cloned() {
            return Ok(q);
        }
        let name = format!("TANDEM_{}_{}", self.namespace, sanitize(queue)).to_uppercase();
        let stream = self
            .js
            .get_or_create_stream(stream::Config {
                name,
                subjects: vec![self.subject(&format!("queue.{queue}"))],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                // Work nobody took for this long is stale (its requester has given up).
                max_age: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("JetStream stream for queue {queue}: {e}"))?;
        let consumer = stream
            .get_or_create_consumer(
                "workers",
                pull::Config {
                    durable_name: Some("workers".into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_deliver: 20,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow!("JetStream consumer for queue {queue}: {e}"))?;
        self.queues
            .lock()
            .insert(queue.to_string(), (stream.clone(), consumer.clone()));
        Ok((stream, consumer))
    }

    /// Forgets the cached stream and consumer, e.g. after a server restart lost them.
    fn forget(&self, queue: &str) {
        self.queues.lock().remove(queue);
    }

    pub async fn queue_push(&self, queue: &str, payload: Vec<u8>) -> Result<()> {
        self.queue(queue).await?;
        let result = async {
            let ack = self
                .js
                .publish(self.subject(&format!("queue.{queue}")), payload.into())
                .await?;
            tokio::time::timeout(OP_TIMEOUT, ack)
                .await
                .map_err(|_| anyhow!("timed out"))??;
            anyhow::Ok(())
        }
        .await;
        result
            .inspect_err(|_| self.forget(queue))
            .with_context(|| format!("enqueueing on {queue}"))
    }

    pub async fn queue_pop(&self, queue: &str, wait: Duration) -> Result<Option<QueueMessage>> {
        let (_, consumer) = self.queue(queue).await?;
        let result = async {
            let mut batch = consumer
                .batch()
                .max_messages(1)
                .expires(wait.max(Duration::from_millis(100)))
                .messages()
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let next = tokio::time::timeout(wait + OP_TIMEOUT, batch.next())
                .await
                .map_err(|_| anyhow!("timed out"))?;
            let Some(msg) = next else {
                return anyhow::Ok(None);
            };
            let msg = msg.map_err(|e| anyhow!("{e}"))?;
            let delivery = msg.info().map(|i| i.delivered.max(1) as u64).unwrap_or(1);
            let payload = msg.payload.to_vec();
            anyhow::Ok(Some(QueueMessage {
                payload,
                delivery,
                acker: Box::new(JsAcker(Arc::new(msg))),
            }))
        }
        .await;
        result
            .inspect_err(|_| self.forget(queue))
            .with_context(|| format!("taking from queue {queue}"))
    }

    pub async fn queue_len(&self, queue: &str) -> Result<usize> {
        let (stream, _) = self.queue(queue).await?;
        let info = stream.get_info().await.map_err(|e| anyhow!("{e}"));
        Ok(info.inspect_err(|_| self.forget(queue))?.state.messages as usize)
    }
}

struct JsAcker(Arc<jetstream::Message>);

impl QueueAcker for JsAcker {
    fn ack(&self) -> BoxFuture<'static, Result<()>> {
        let msg = self.0.clone();
        Box::pin(async move {
            let acked = tokio::time::timeout(OP_TIMEOUT, msg.double_ack()).await;
            acked
                .map_err(|_| anyhow!("ack timed out"))?
                .map_err(|e| anyhow!("ack: {e}"))
        })
    }
    fn progress(&self) -> BoxFuture<'static, Result<()>> {
        let msg = self.0.clone();
        Box::pin(async move {
            msg.ack_with(jetstream::AckKind::Progress)
                .await
                .map_err(|e| anyhow!("progress: {e}"))
        })
    }
}

/// Publishes a response's frames to the client's inbox, with heartbeats, until it ends or the
/// client cancels.
async fn pump_response(
    client: async_nats::Client,
    reply: String,
    mut frames: mpsc::Receiver<Frame>,
    cancel: CancellationToken,
) {
    let mut cancel_sub = match client.subscribe(format!("{reply}.cancel")).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("subscribing for cancellation: {e}");
            return;
        }
    };
    let publish = |frame: Frame| {
        let client = client.clone();
        let reply = reply.clone();
        async move { client.publish(reply, frame.encode().into()).await }
    };
    let _ = publish(Frame::Heartbeat).await; // tells the client the request arrived
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let frame = frame.unwrap_or_else(|| Frame::Error("the server dropped the response".into()));
                let last = matches!(frame, Frame::End | Frame::Error(_));
                let _ = publish(frame).await;
                if last {
                    break;
                }
            }
            _ = heartbeat.tick() => {
                let _ = publish(Frame::Heartbeat).await;
            }
            _ = cancel_sub.next() => {
                cancel.cancel();
                break;
            }
        }
    }
}
