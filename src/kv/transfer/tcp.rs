//! KV blocks over a TCP stream, staged through host memory: works between any two machines.
//!
//! Framing, per write: `u32` header length, a JSON [`FrameHeader`], then `len` payload bytes; the
//! server answers each frame with `u32` length + JSON [`FrameReply`]. Connections are kept open
//! and reused, so a transfer costs no handshake.

use super::{check_write, BlockWrite, KvEndpoint, KvSink, KvTransfer};
use anyhow::{anyhow, bail, ensure, Context, Result};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEADER: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct FrameHeader {
    request_id: String,
    rank: usize,
    block_ids: Vec<u32>,
    len: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct FrameReply {
    error: Option<String>,
}

/// Time allowed for one frame: generous, but bounded (assumes at least 50 MB/s).
fn frame_timeout(len: usize) -> Duration {
    Duration::from_secs(10) + Duration::from_millis((len / 50_000) as u64)
}

async fn write_json<T: Serialize>(stream: &mut TcpStream, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec(value)?;
    stream
        .write_all(&(bytes.len() as u32).to_le_bytes())
        .await?;
    stream.write_all(&bytes).await?;
    Ok(())
}

/// Reads one length-prefixed JSON value; `None` on a clean end of stream.
async fn read_json<T: for<'de> Deserialize<'de>>(stream: &mut TcpStream) -> Result<Option<T>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    ensure!(
        len <= MAX_HEADER,
        "KV frame header of {len} bytes is too large"
    );
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(Some(serde_json::from_slice(&buf)?))
}

/// The receiving end: accepts connections and writes every frame into `sink`.
pub struct TcpKvServer {
    addr: String,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TcpKvServer {
    /// Listens on `bind` (e.g. `0.0.0.0:0`); `advertise_host` is the host others reach it by.
    pub async fn start(bind: &str, advertise_host: &str, sink: Arc<dyn KvSink>) -> Result<Self> {
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("KV server: bind {bind}"))?;
        let port = listener.local_addr()?.port();
        let accept_task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let sink = sink.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve_connection(stream, sink).await {
                                tracing::warn!("KV connection from {peer}: {e:#}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("KV server accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(Self {
            addr: format!("{advertise_host}:{port}"),
            accept_task,
        })
    }

    pub fn endpoint(&self) -> KvEndpoint {
        KvEndpoint::Tcp {
            addr: self.addr.clone(),
        }
    }
}

impl Drop for TcpKvServer {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn serve_connection(mut stream: TcpStream, sink: Arc<dyn KvSink>) -> Result<()> {
    stream.set_nodelay(true)?;
    // Idle connections stay open; a half-received frame is bounded by its timeout.
    while let Some(header) = read_json::<FrameHeader>(&mut stream).await? {
        let write = BlockWrite {
            request_id: header.request_id,
            rank: header.rank,
            block_ids: header.block_ids,
            data: Arc::new(Vec::new()),
        };
        let expected = write.block_ids.len() * sink.rank_layout().block_bytes();
        if header.len != expected {
            // The payload size is untrusted: refuse before allocating, and drop the connection.
            let error = format!(
                "KV frame of {} bytes for {} blocks; expected {expected}",
                header.len,
                write.block_ids.len()
            );
            write_json(
                &mut stream,
                &FrameReply {
                    error: Some(error.clone()),
                },
            )
            .await?;
            bail!(error);
        }
        // Read into spare capacity: no pass to zero the buffer first.
        let mut data = Vec::with_capacity(header.len);
        let mut payload = (&mut stream).take(header.len as u64);
        tokio::time::timeout(frame_timeout(header.len), payload.read_to_end(&mut data))
            .await
            .map_err(|_| anyhow!("KV frame payload timed out"))??;
        ensure!(data.len() == header.len, "KV frame payload cut short");
        let write = BlockWrite {
            data: Arc::new(data),
            ..write
        };
        let result = match check_write(&sink.rank_layout(), sink.tp(), &write) {
            Ok(()) => sink.write_blocks(write).await,
            Err(e) => Err(e),
        };
        let reply = FrameReply {
            error: result.err().map(|e| format!("{e:#}")),
        };
        write_json(&mut stream, &reply).await?;
    }
    Ok(())
}

/// The sending end, with a pool of open connections per address.
#[derive(Clone, Default)]
pub struct TcpTransfer {
    idle: Arc<Mutex<HashMap<String, Vec<TcpStream>>>>,
}

impl TcpTransfer {
    pub fn new() -> Self {
        Self::default()
    }

    async fn connect(&self, addr: &str) -> Result<TcpStream> {
        if let Some(stream) = self.idle.lock().get_mut(addr).and_then(|v| v.pop()) {
            return Ok(stream);
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to KV server {addr} timed out"))?
            .with_context(|| format!("connecting to KV server {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn send_frame(stream: &mut TcpStream, write: &BlockWrite) -> Result<FrameReply> {
        let header = FrameHeader {
            request_id: write.request_id.clone(),
            rank: write.rank,
            block_ids: write.block_ids.clone(),
            len: write.data.len(),
        };
        let io = async {
            write_json(stream, &header).await?;
            stream.write_all(&write.data).await?;
            read_json::<FrameReply>(stream)
                .await?
                .ok_or_else(|| anyhow!("KV server closed the connection"))
        };
        tokio::time::timeout(frame_timeout(write.data.len()), io)
            .await
            .map_err(|_| anyhow!("KV frame of {} bytes timed out", write.data.len()))?
    }

    async fn write_to(self, addr: String, write: BlockWrite) -> Result<()> {
        // A pooled connection may have been closed by the peer since; retry once on a fresh one
        // (writes are idempotent: the same bytes into the same blocks).
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut stream = self.connect(&addr).await?;
            match Self::send_frame(&mut stream, &write).await {
                Ok(reply) => {
                    self.idle
                        .lock()
                        .entry(addr.clone())
                        .or_default()
                        .push(stream);
                    return match reply.error {
                        None => Ok(()),
                        Some(e) => Err(anyhow!("KV server {addr} refused the write: {e}")),
                    };
                }
                Err(e) if attempt < 2 => {
                    tracing::debug!("KV frame to {addr} failed, retrying: {e:#}")
                }
                Err(e) => return Err(e.context(format!("KV transfer to {addr}"))),
            }
        }
    }
}

impl KvTransfer for TcpTransfer {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn supports(&self, endpoint: &KvEndpoint) -> bool {
        matches!(endpoint, KvEndpoint::Tcp { .. })
    }

    fn write(&self, endpoint: &KvEndpoint, write: BlockWrite) -> BoxFuture<'static, Result<()>> {
        let this = self.clone();
        let endpoint = endpoint.clone();
        Box::pin(async move {
            match endpoint {
                KvEndpoint::Tcp { addr } => this.write_to(addr, write).await,
                other => Err(anyhow!("TCP transfer cannot reach {other:?}")),
            }
        })
    }
}
