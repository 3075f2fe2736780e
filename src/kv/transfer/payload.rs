//! A prompt's KV as a prefill engine hands it out: host bytes, or blocks staged on its GPU
//! ([`DeviceKv`]). A transfer that reaches the destination's device memory (the in-process one,
//! when the decode engine is a CUDA backend of this process) takes the device payload as it is;
//! any other transport gets it read back to host bytes.

use super::cuda::DeviceKv;
use super::{pick, send_kv, KvDestination, KvShards, KvTransfer};
use crate::backend::KvLayout;
use anyhow::{anyhow, ensure, Context, Result};
use std::sync::Arc;

/// The KV of blocks `from..` of an export.
#[derive(Debug, Clone)]
pub enum KvPayload {
    /// `Backend::export_blocks` wire format.
    Host(Vec<u8>),
    /// Staged blocks `from..` of `kv`.
    Device { kv: Arc<DeviceKv>, from: usize },
}

impl KvPayload {
    pub fn is_device(&self) -> bool {
        matches!(self, KvPayload::Device { .. })
    }

    pub fn num_blocks(&self, layout: &KvLayout) -> usize {
        match self {
            KvPayload::Host(bytes) => bytes.len() / layout.block_bytes().max(1),
            KvPayload::Device { kv, from } => kv.num_blocks().saturating_sub(*from),
        }
    }

    /// Host bytes (reads a device payload back: slow, for transports that need bytes).
    pub fn into_host(self) -> Result<Vec<u8>> {
        match self {
            KvPayload::Host(bytes) => Ok(bytes),
            KvPayload::Device { kv, from } => kv.to_host(from),
        }
    }
}

/// A device payload on its way into a destination's blocks.
#[derive(Debug, Clone)]
pub struct DeviceWrite {
    pub request_id: String,
    /// Destination blocks, one per staged block `from..`.
    pub block_ids: Vec<u32>,
    pub kv: Arc<DeviceKv>,
    pub from: usize,
}

/// [`send_kv`] for a payload: a device payload goes as it is when the chosen transfer takes it,
/// else as host bytes. `layout` is the source's (all heads, TP1).
pub async fn send_payload(
    transfers: &[Arc<dyn KvTransfer>],
    dest: &KvDestination,
    request_id: &str,
    dst_blocks: &[u32],
    layout: KvLayout,
    payload: KvPayload,
) -> Result<()> {
    let (kv, from) = match payload {
        KvPayload::Host(bytes) => {
            let shards = KvShards::single(layout, bytes);
            return send_kv(transfers, dest, request_id, dst_blocks, shards).await;
        }
        KvPayload::Device { kv, from } => (kv, from),
    };
    let n = kv.num_blocks().saturating_sub(from);
    ensure!(
        n <= dst_blocks.len(),
        "request {request_id}: {n} KV blocks to send but only {} destination blocks",
        dst_blocks.len()
    );
    let (transfer, endpoint) = pick(transfers, &dest.endpoints)?;
    let write = DeviceWrite {
        request_id: request_id.to_string(),
        block_ids: dst_blocks[..n].to_vec(),
        kv: kv.clone(),
        from,
    };
    if let Some(done) = transfer.write_device(&endpoint, &write) {
        return done.await.with_context(|| {
            format!(
                "device KV transfer of request {request_id} via {}",
                transfer.name()
            )
        });
    }
    drop(write);
    let bytes = tokio::task::spawn_blocking(move || kv.to_host(from))
        .await
        .map_err(|e| anyhow!("reading staged KV back: {e}"))??;
    let shards = KvShards::single(layout, bytes);
    send_kv(transfers, dest, request_id, dst_blocks, shards).await
}
