//! Messages between the workers of a disaggregated deployment, and the names they travel under.

use crate::engine::types::GenerateRequest;
use crate::engine::RemotePrefillTicket;
use crate::kv::transfer::KvDestination;
use serde::{Deserialize, Serialize};

/// The work queue that prefill workers take jobs from.
pub const PREFILL_QUEUE: &str = "prefill";

/// Subject a worker serves `generate` requests on.
pub fn generate_subject(worker_id: &str) -> String {
    format!("generate.{}", crate::runtime::sanitize(worker_id))
}

/// Subject a worker publishes its load on.
pub fn metrics_subject(worker_id: &str) -> String {
    format!("metrics.{}", crate::runtime::sanitize(worker_id))
}

/// Subject a decode worker hears "your KV is written" on.
pub fn kv_ready_subject(worker_id: &str) -> String {
    format!("kv_ready.{}", crate::runtime::sanitize(worker_id))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WorkerRole {
    /// Prefill and decode in one engine.
    Agg,
    /// Takes prompts from the prefill queue and writes their KV into decode workers.
    Prefill,
    /// Receives requests, has long prompts prefilled remotely, decodes.
    Decode,
}

impl WorkerRole {
    /// Whether the frontend sends requests to this role.
    pub fn serves_requests(self) -> bool {
        matches!(self, WorkerRole::Agg | WorkerRole::Decode)
    }
}

/// What a worker publishes in discovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub role: WorkerRole,
    pub model: String,
    pub block_size: usize,
}

/// A decode worker's request to have a prompt prefilled elsewhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemotePrefillRequest {
    /// Carries the request id, the prompt's token ids and the sampling parameters (the first
    /// token is sampled by the prefill worker).
    pub request: GenerateRequest,
    pub decode_worker_id: String,
    /// The destination blocks (`ticket.blocks_to_write()` are written).
    pub ticket: RemotePrefillTicket,
    pub destination: KvDestination,
}

/// A prefill worker's answer to a decode worker, after the KV is written (or not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvReady {
    pub request_id: String,
    /// The first token, or why the prefill failed (the decode worker then prefills locally).
    pub result: Result<u32, String>,
}
