//! Checks a request against the engine's limits before it is queued, so that a bad request gets a
//! clear error at once and a queued one can always run.

use crate::engine::handle::Limits;
use crate::engine::scheduler::blocks_for;
use crate::engine::types::{EngineError, GenerateRequest};

pub fn validate(req: &GenerateRequest, limits: &Limits) -> Result<(), EngineError> {
    let invalid = |msg: String| Err(EngineError::InvalidRequest(msg));
    let p = &req.params;
    let prompt = req.prompt_tokens.len();
    if prompt == 0 {
        return invalid("the prompt is empty".into());
    }
    if p.max_tokens == 0 {
        return invalid("max_tokens must be at least 1".into());
    }
    if let Some(&t) = req
        .prompt_tokens
        .iter()
        .find(|&&t| t as usize >= limits.vocab_size)
    {
        return invalid(format!(
            "prompt token {t} is outside the vocabulary (size {})",
            limits.vocab_size
        ));
    }
    if prompt + p.max_tokens > limits.max_model_len {
        return Err(EngineError::PromptTooLong {
            prompt_tokens: prompt,
            max_tokens: p.max_tokens,
            max_model_len: limits.max_model_len,
        });
    }
    // The last generated token's KV is never written.
    let needed = blocks_for(prompt + p.max_tokens - 1, limits.block_size);
    if needed > limits.num_blocks {
        return Err(EngineError::NeverFits {
            needed,
            total: limits.num_blocks,
        });
    }
    if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
        return invalid(format!("temperature must be >= 0, got {}", p.temperature));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return invalid(format!("top_p must be in (0, 1], got {}", p.top_p));
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        return invalid(format!("min_p must be in [0, 1], got {}", p.min_p));
    }
    if !(p.repetition_penalty > 0.0 && p.repetition_penalty.is_finite()) {
        return invalid(format!(
            "repetition_penalty must be > 0, got {}",
            p.repetition_penalty
        ));
    }
    if !p.presence_penalty.is_finite() || !p.frequency_penalty.is_finite() {
        return invalid("presence_penalty and frequency_penalty must be finite".into());
    }
    if p.min_tokens > p.max_tokens {
        return invalid(format!(
            "min_tokens ({}) must not exceed max_tokens ({})",
            p.min_tokens, p.max_tokens
        ));
    }
    if let Some(n) = p.logprobs {
        if n > limits.vocab_size {
            return invalid(format!("logprobs ({n}) exceeds the vocabulary size"));
        }
    }
    if !p.stop.is_empty() && !limits.has_tokenizer {
        return invalid("stop strings need a tokenizer, and this engine has none".into());
    }
    Ok(())
}
