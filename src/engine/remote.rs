//! What disaggregated prefill/decode exchanges with an engine (see the module doc of `engine`).

use crate::backend::KvLayout;
use crate::kv::transfer::cuda::DeviceKv;
use crate::kv::transfer::KvPayload;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Given by the decode side's `generate_remote_prefill`: where the prompt's KV must be written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemotePrefillTicket {
    pub request_id: String,
    /// KV blocks of the whole prompt, in order (block `i` holds positions `i*block_size..`).
    pub block_ids: Vec<u32>,
    /// Leading blocks already holding this prompt's KV (local prefix-cache hits): the transfer
    /// may skip them, and `import_kv` refuses to overwrite them.
    pub num_cached_blocks: usize,
    pub layout: KvLayout,
    /// When the decode side stops waiting (`--remote-prefill-timeout`) and prefills the prompt
    /// itself, as UNIX milliseconds: a prefill worker that gets the job later drops it instead of
    /// computing a prompt nobody waits for. None: no deadline (older senders).
    #[serde(default)]
    pub expires_at_unix_ms: Option<u64>,
}

impl RemotePrefillTicket {
    /// The blocks a transfer must fill.
    pub fn blocks_to_write(&self) -> &[u32] {
        &self.block_ids[self.num_cached_blocks..]
    }

    /// Has the decode side stopped waiting for it (by this machine's clock)? From the expiry's
    /// millisecond on: the decode side may give up within that millisecond and finish the request
    /// before the job is taken.
    pub fn expired(&self) -> bool {
        self.expires_at_unix_ms
            .is_some_and(|t| unix_ms(std::time::SystemTime::now()) >= t)
    }
}

/// Milliseconds since the UNIX epoch (0 before it).
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The prefill side's result from `prefill_and_export`.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillExport {
    pub first_token: u32,
    /// The prompt's KV blocks in `Backend::export_blocks` wire format, `num_blocks` of them
    /// (empty when `device` holds them).
    pub kv: Vec<u8>,
    /// The blocks staged on the prefill GPU, for `prefill_and_export_on_device`.
    pub device: Option<Arc<DeviceKv>>,
    pub num_blocks: usize,
    pub layout: KvLayout,
    pub prompt_tokens: usize,
    /// Prompt tokens the prefill worker found in its own prefix cache.
    pub cached_tokens: usize,
}

impl PrefillExport {
    /// Blocks `from..` (to skip the decode side's cached blocks), wherever they are.
    pub fn into_payload(self, from: usize) -> KvPayload {
        match self.device {
            Some(kv) => KvPayload::Device { kv, from },
            None => {
                let mut kv = self.kv;
                kv.drain(..(from * self.layout.block_bytes()).min(kv.len()));
                KvPayload::Host(kv)
            }
        }
    }

    /// The bytes of blocks `from..` of a host export (empty for a device one).
    pub fn blocks_from(&self, from: usize) -> &[u8] {
        let bb = self.layout.block_bytes();
        &self.kv[(from * bb).min(self.kv.len())..]
    }
}
