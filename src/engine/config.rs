//! Engine limits and switches (the CLI fills them from vLLM-named flags).

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Longest prompt + generation; `None` = the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// Token budget of one step (decodes + prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Split long prompts into chunks that fit the step budget. Off: a prompt is prefilled in one
    /// step (the budget is raised to `max_model_len` if smaller).
    pub enable_chunked_prefill: bool,
    pub enable_prefix_caching: bool,
    /// Size of the KV pool the backend is built with (`None`: the CLI derives it from memory, see
    /// `cli::common::EngineArgs::num_kv_blocks`). The engine itself uses the backend's count.
    pub num_kv_blocks: Option<usize>,
    /// Requests waiting to start beyond which `generate` answers `QueueFull`.
    pub max_queue_len: usize,
    /// How long a sequence waits for its remote prefill before prefilling locally.
    pub remote_prefill_timeout: Duration,
    /// Schedule and launch step n + 1 while the device computes step n (vLLM's
    /// `--async-scheduling`); a decode's input token then comes from the device (`backend::steps`).
    pub async_scheduling: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_model_len: None,
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            enable_chunked_prefill: true,
            enable_prefix_caching: true,
            num_kv_blocks: None,
            max_queue_len: 4096,
            remote_prefill_timeout: Duration::from_secs(30),
            async_scheduling: true,
        }
    }
}
