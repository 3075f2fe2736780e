//! Discovery and messaging between the parts of a deployment, in one process or across machines.
//!
//! One trait, [`Runtime`], with two implementations: [`local::LocalRuntime`] (everything in this
//! process, no servers: the embedded deployment and tests) and [`distributed::DistributedRuntime`]
//! (etcd for discovery under leases, NATS for requests, notifications and the JetStream work
//! queue). Payloads are opaque bytes: the layers above choose their own message types.
//!
//! Four services:
//! - discovery: an instance registers with some info and stays listed while it lives (an etcd
//!   lease with keep-alive); watchers see instances come and go.
//! - request plane: `request(subject, payload)` returns a stream of response chunks; the server
//!   side answers through a [`Responder`] and sees the client's cancellation.
//! - notifications: fire-and-forget publish/subscribe.
//! - work queues: each message goes to one consumer and stays queued until acknowledged, so work
//!   taken by a consumer that dies is delivered again.

pub mod distributed;
pub mod etcd;
pub mod local;
pub mod nats;

use anyhow::Result;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A registered instance: its id and the info it published (bytes, JSON by convention).
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: String,
    pub info: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DiscoveryEvent {
    /// Registered, or its info changed.
    Up(Instance),
    /// Deregistered, or its lease expired.
    Down(String),
}

/// Keeps an instance registered; dropping it deregisters.
pub struct Registration {
    cancel: CancellationToken,
}

impl Registration {
    pub fn new(cancel: CancellationToken) -> Self {
        Self { cancel }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// One frame of a streamed response.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Data(Vec<u8>),
    /// The response is complete.
    End,
    /// The server failed; the stream ends.
    Error(String),
    /// The server is alive and still working.
    Heartbeat,
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Frame::Data(d) => [b"D".as_slice(), d].concat(),
            Frame::End => b"E".to_vec(),
            Frame::Error(e) => [b"X".as_slice(), e.as_bytes()].concat(),
            Frame::Heartbeat => b"H".to_vec(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Frame> {
        Ok(match bytes.split_first() {
            Some((b'D', rest)) => Frame::Data(rest.to_vec()),
            Some((b'E', _)) => Frame::End,
            Some((b'X', rest)) => Frame::Error(String::from_utf8_lossy(rest).into_owned()),
            Some((b'H', _)) => Frame::Heartbeat,
            _ => anyhow::bail!("malformed response frame"),
        })
    }
}

/// A request as a server receives it.
pub struct IncomingRequest {
    pub payload: Vec<u8>,
    pub responder: Responder,
}

/// The server's side of one response stream.
pub struct Responder {
    tx: mpsc::Sender<Frame>,
    cancel: CancellationToken,
}

impl Responder {
    pub fn new(tx: mpsc::Sender<Frame>, cancel: CancellationToken) -> Self {
        Self { tx, cancel }
    }

    /// Sends one chunk; errors once the client is gone.
    pub async fn send(&self, data: Vec<u8>) -> Result<()> {
        if self.cancel.is_cancelled() {
            anyhow::bail!("the client cancelled the request");
        }
        self.tx
            .send(Frame::Data(data))
            .await
            .map_err(|_| anyhow::anyhow!("the client is gone"))
    }

    pub async fn end(self) {
        let _ = self.tx.send(Frame::End).await;
    }

    pub async fn fail(self, error: String) {
        let _ = self.tx.send(Frame::Error(error)).await;
    }

    /// Resolves when the client cancels (drops its stream).
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// A response as the client receives it: chunks, then the end. Dropping it cancels the request.
pub type ResponseStream = BoxStream<'static, Result<Vec<u8>>>;

/// A message taken from a work queue. Unless [`QueueMessage::ack`] is called, it is delivered
/// again (to this or another consumer).
pub struct QueueMessage {
    pub payload: Vec<u8>,
    /// How many times it was delivered, this time included.
    pub delivery: u64,
    pub acker: Box<dyn QueueAcker>,
}

pub trait QueueAcker: Send + Sync {
    /// Done: remove it from the queue for good.
    fn ack(&self) -> BoxFuture<'static, Result<()>>;
    /// Not done and still working: push back the redelivery deadline.
    fn progress(&self) -> BoxFuture<'static, Result<()>>;
}

impl QueueMessage {
    pub async fn ack(&self) -> Result<()> {
        self.acker.ack().await
    }
    pub async fn progress(&self) -> Result<()> {
        self.acker.progress().await
    }
}

/// How long a client waits for any frame (data or heartbeat) before it gives the server up.
pub const RESPONSE_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a server sends a heartbeat on an open response stream.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(1000);

pub trait Runtime: Send + Sync {
    /// Registers `id` with `info` until the returned registration is dropped.
    fn register(&self, id: &str, info: Vec<u8>) -> BoxFuture<'_, Result<Registration>>;
    /// Every registered instance now (as `Up` events), then changes as they happen.
    fn watch(&self) -> BoxFuture<'_, Result<BoxStream<'static, DiscoveryEvent>>>;

    /// Starts serving `subject`: each request arrives on the returned stream.
    fn serve(&self, subject: &str) -> BoxFuture<'_, Result<BoxStream<'static, IncomingRequest>>>;
    /// Sends a request; fails if nobody answers within the idle timeout.
    fn request(&self, subject: &str, payload: Vec<u8>) -> BoxFuture<'_, Result<ResponseStream>>;

    fn publish(&self, subject: &str, payload: Vec<u8>) -> BoxFuture<'_, Result<()>>;
    fn subscribe(&self, subject: &str) -> BoxFuture<'_, Result<BoxStream<'static, Vec<u8>>>>;

    fn queue_push(&self, queue: &str, payload: Vec<u8>) -> BoxFuture<'_, Result<()>>;
    /// Takes one message, waiting up to `wait`; `None` if the queue stayed empty.
    fn queue_pop(&self, queue: &str, wait: Duration)
        -> BoxFuture<'_, Result<Option<QueueMessage>>>;
    /// Messages queued and not yet acknowledged.
    fn queue_len(&self, queue: &str) -> BoxFuture<'_, Result<usize>>;
}

/// Turns the frames of one response into the client's stream: data until `End`; an error on
/// `Error`, on a server gone silent for `idle` (when set), or on a closed channel. Dropping the
/// stream fires `cancel`.
pub fn response_stream(
    mut frames: mpsc::Receiver<Frame>,
    idle: Option<Duration>,
    cancel: CancellationToken,
) -> ResponseStream {
    Box::pin(async_stream::stream! {
        let _guard = cancel.drop_guard();
        loop {
            let next = match idle {
                Some(idle) => match tokio::time::timeout(idle, frames.recv()).await {
                    Ok(f) => f,
                    Err(_) => {
                        yield Err(anyhow::anyhow!("no response from the server in {idle:?}"));
                        break;
                    }
                },
                None => frames.recv().await,
            };
            match next {
                Some(Frame::Data(d)) => yield Ok(d),
                Some(Frame::Heartbeat) => {}
                Some(Frame::End) => break,
                Some(Frame::Error(e)) => {
                    yield Err(anyhow::anyhow!(e));
                    break;
                }
                None => {
                    yield Err(anyhow::anyhow!("the server closed the response without finishing it"));
                    break;
                }
            }
        }
    })
}

/// Keeps names usable as NATS subject tokens, stream names and etcd key parts.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
