//! Moving KV blocks from a prefill worker into a decode worker's blocks.
//!
//! One interface, [`KvTransfer`], block-granular, with one implementation per way of reaching the
//! destination: [`local::InProcessTransfer`] (a copy inside one process), [`tcp::TcpTransfer`]
//! (host-staged bytes over a TCP stream, any two machines). [`cuda`] moves blocks device to device
//! on one node (peer access or CUDA IPC, TP split/merge by head offsets); the in-process transfer
//! uses it for device payloads ([`payload`]) between CUDA engines of one process. An RDMA path (NIXL, UCX) would be a further implementation,
//! chosen by the [`KvEndpoint`] a decode worker advertises; `docs/kv-transfer.md` describes both.
//!
//! Data travels in the backend's export wire format (`Backend::export_blocks`): for each block,
//! for each layer, K then V, each `[num_kv_heads, block_size, head_dim]`. When the prefill and the
//! decode worker use different tensor-parallel sizes, [`reshard`] splits or merges the KV heads so
//! that each destination rank receives exactly the heads it owns.

pub mod cuda;
pub mod local;
pub mod payload;
pub mod reshard;
pub mod tcp;

use crate::backend::KvLayout;
use anyhow::{bail, ensure, Context, Result};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use payload::{send_payload, DeviceWrite, KvPayload};
pub use reshard::reshard;

/// One way to reach a decode worker's KV pool. A decode worker offers several, best first; the
/// sender takes the first one it has a transfer for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvEndpoint {
    /// A sink registered in this process's [`local::InProcessTransfer`] registry under `key`.
    InProcess { key: String },
    /// A [`tcp::TcpKvServer`] listening at `addr` (`host:port`).
    Tcp { addr: String },
}

/// Where a remote prefill's KV goes: everything a prefill worker needs besides the block ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvDestination {
    /// Offered transports, best first.
    pub endpoints: Vec<KvEndpoint>,
    /// Layout of one destination rank (its share of the KV heads).
    pub rank_layout: KvLayout,
    /// Tensor-parallel size of the destination; rank `r` owns heads `r*h..(r+1)*h`.
    pub tp: usize,
}

/// KV of some blocks as the source holds it: one wire-format buffer per source rank.
#[derive(Debug, Clone)]
pub struct KvShards {
    pub rank_layout: KvLayout,
    pub shards: Vec<Vec<u8>>,
}

impl KvShards {
    /// The KV of a single-rank (TP1) source.
    pub fn single(layout: KvLayout, data: Vec<u8>) -> Self {
        Self {
            rank_layout: layout,
            shards: vec![data],
        }
    }

    pub fn tp(&self) -> usize {
        self.shards.len()
    }

    /// Number of blocks held; errors if the shards disagree with the layout.
    pub fn num_blocks(&self) -> Result<usize> {
        let block_bytes = self.rank_layout.block_bytes();
        ensure!(!self.shards.is_empty(), "KV shards: no ranks");
        let len = self.shards[0].len();
        ensure!(
            block_bytes > 0 && len.is_multiple_of(block_bytes),
            "KV shard of {len} bytes is not a whole number of {block_bytes}-byte blocks"
        );
        ensure!(
            self.shards.iter().all(|s| s.len() == len),
            "KV shards differ in length"
        );
        Ok(len / block_bytes)
    }
}

/// One rank's part of a transfer: its wire-format bytes for `block_ids`, in order.
#[derive(Debug, Clone)]
pub struct BlockWrite {
    pub request_id: String,
    pub rank: usize,
    pub block_ids: Vec<u32>,
    pub data: Arc<Vec<u8>>,
}

/// The receiving end inside a decode worker. It must refuse writes for a request that no longer
/// waits for these blocks (finished, cancelled, or fell back to local prefill): those blocks may
/// already belong to another request.
pub trait KvSink: Send + Sync {
    fn rank_layout(&self) -> KvLayout;
    fn tp(&self) -> usize;
    fn write_blocks(&self, write: BlockWrite) -> BoxFuture<'static, Result<()>>;
    /// Whether `write_device` can take a device payload (a CUDA engine of this process).
    fn accepts_device(&self) -> bool {
        false
    }
    /// Takes a device payload as it is (`None`: this sink needs host bytes).
    fn write_device(&self, _write: DeviceWrite) -> Option<BoxFuture<'static, Result<()>>> {
        None
    }
}

/// A way of moving one rank's blocks to a destination.
pub trait KvTransfer: Send + Sync {
    fn name(&self) -> &'static str;
    fn supports(&self, endpoint: &KvEndpoint) -> bool;
    fn write(&self, endpoint: &KvEndpoint, write: BlockWrite) -> BoxFuture<'static, Result<()>>;
    /// Whether a device payload reaches `endpoint` without host staging (worth staging on device).
    fn accepts_device(&self, _endpoint: &KvEndpoint) -> bool {
        false
    }
    /// Moves a device payload without host staging, when this transfer and the destination can
    /// (`None`: send host bytes instead).
    fn write_device(
        &self,
        _endpoint: &KvEndpoint,
        _write: &DeviceWrite,
    ) -> Option<BoxFuture<'static, Result<()>>> {
        None
    }
}

/// Sends the KV of `src` into `dst_blocks` of a destination, resharding the heads to its TP size
/// and writing all ranks concurrently through the first transfer that reaches it. Only the first
/// `src.num_blocks()` of `dst_blocks` are written.
pub async fn send_kv(
    transfers: &[Arc<dyn KvTransfer>],
    dest: &KvDestination,
    request_id: &str,
    dst_blocks: &[u32],
    src: KvShards,
) -> Result<()> {
    let num_blocks = src.num_blocks()?;
    ensure!(
        num_blocks <= dst_blocks.len(),
        "request {request_id}: {num_blocks} KV blocks to send but only {} destination blocks",
        dst_blocks.len()
    );
    let (transfer, endpoint) = pick(transfers, &dest.endpoints)?;
    let shards = if src.tp() == dest.tp {
        src
    } else {
        reshard(&src, dest.tp)?
    };
    ensure!(
        shards.rank_layout == dest.rank_layout,
        "KV layout mismatch: source gives {:?} per destination rank, destination holds {:?}",
        shards.rank_layout,
        dest.rank_layout
    );
    let writes = shards.shards.into_iter().enumerate().map(|(rank, data)| {
        transfer.write(
            &endpoint,
            BlockWrite {
                request_id: request_id.to_string(),
                rank,
                block_ids: dst_blocks[..num_blocks].to_vec(),
                data: Arc::new(data),
            },
        )
    });
    for result in futures::future::join_all(writes).await {
        result.with_context(|| {
            format!(
                "KV transfer of request {request_id} via {}",
                transfer.name()
            )
        })?;
    }
    Ok(())
}

/// Whether the transfer [`send_kv`] would pick for `dest` takes device payloads as they are.
pub fn accepts_device(transfers: &[Arc<dyn KvTransfer>], dest: &KvDestination) -> bool {
    pick(transfers, &dest.endpoints).is_ok_and(|(t, e)| t.accepts_device(&e))
}

fn pick(
    transfers: &[Arc<dyn KvTransfer>],
    endpoints: &[KvEndpoint],
) -> Result<(Arc<dyn KvTransfer>, KvEndpoint)> {
    for endpoint in endpoints {
        if let Some(t) = transfers.iter().find(|t| t.supports(endpoint)) {
            return Ok((t.clone(), endpoint.clone()));
        }
    }
    bail!("no KV transfer here reaches any of the destination's endpoints {endpoints:?}")
}

/// Checks a write against the sink's layout before it touches any block.
pub fn check_write(layout: &KvLayout, tp: usize, write: &BlockWrite) -> Result<()> {
    ensure!(
        write.rank < tp,
        "KV write for rank {} but the destination has {tp} ranks",
        write.rank
    );
    let expected = write.block_ids.len() * layout.block_bytes();
    ensure!(
        write.data.len() == expected,
        "KV write of {} bytes for {} blocks; expected {expected}",
        write.data.len(),
        write.block_ids.len()
    );
    Ok(())
}
