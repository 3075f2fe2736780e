//! What goes into and comes out of an engine. Shared by workers, the router, the frontend and the
//! in-process benchmark; serializable so the same types travel over NATS.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 = greedy
    pub temperature: f32,
    /// 0 = off
    pub top_k: usize,
    /// 1.0 = off
    pub top_p: f32,
    /// 0.0 = off
    pub min_p: f32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0 = off
    pub repetition_penalty: f32,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    /// Return the top-N logprobs of each generated token.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            max_tokens: 16,
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: vec![],
            stop: vec![],
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub id: String,
    pub prompt_tokens: Vec<u32>,
    pub params: SamplingParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// max_tokens reached
    Length,
    /// EOS, a stop token id or a stop string
    Stop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// The top-N alternatives (token id, logprob), best first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// One streamed piece of a generation: the tokens produced since the previous piece.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    pub token_ids: Vec<u32>,
    /// Text delta for `token_ids` (empty without a tokenizer, or while a character is incomplete).
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the last piece.
    pub finish_reason: Option<FinishReason>,
    pub usage: Usage,
}

/// Every way a request can fail; the frontend maps these to HTTP status codes in one place.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum EngineError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("this model's maximum context length is {max_model_len} tokens, but {prompt_tokens} prompt tokens plus max_tokens {max_tokens} were requested")]
    PromptTooLong {
        prompt_tokens: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error("request needs {needed} KV blocks but the pool has only {total}")]
    NeverFits { needed: usize, total: usize },
    #[error("the server is at capacity ({0} requests waiting); retry later")]
    QueueFull(usize),
    #[error("worker unavailable: {0}")]
    Unavailable(String),
    #[error("engine failure: {0}")]
    Internal(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

/// A snapshot that a router and `/metrics` read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineMetrics {
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_active: usize,
    /// Fraction of prompt tokens found in the prefix cache since start.
    pub prefix_hit_rate: f64,
    pub last_step_ms: f64,
    pub generated_tokens_per_s: f64,
    pub steps: u64,
    /// Sequences preempted (blocks freed, recomputed later) since start.
    #[serde(default)]
    pub num_preemptions: u64,
}
