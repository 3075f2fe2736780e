//! Runs a validated request on the router and assembles the non-streaming response; the pieces
//! that streaming shares (per-choice state, logprob formats) live here too.

use super::error::ApiError;
use super::openai::*;
use super::tokenizer::PromptTokenizer;
use super::validate::ValidRequest;
use super::AppState;
use crate::engine::types::{EngineError, FinishReason, GenerateOutput, TokenLogprob};
use crate::worker::OutputStream;
use futures::StreamExt;
use std::time::Instant;
use tokio::time::Instant as TokioInstant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completion,
}

/// What one choice has produced so far.
#[derive(Debug, Default)]
pub struct ChoiceState {
    pub prompt_len: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    pub cached_tokens: usize,
    /// Characters of token text emitted so far (completions' `text_offset`).
    pub text_offset: usize,
}

impl ChoiceState {
    pub fn absorb(&mut self, out: &GenerateOutput) {
        self.text.push_str(&out.text);
        self.token_ids.extend_from_slice(&out.token_ids);
        self.logprobs.extend(out.logprobs.iter().cloned());
        self.cached_tokens = self.cached_tokens.max(out.usage.cached_tokens);
        if out.finish_reason.is_some() {
            self.finish = out.finish_reason;
        }
    }
}

pub fn finish_str(f: Option<FinishReason>) -> Option<&'static str> {
    f.map(|f| match f {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
    })
}

/// Usage over all choices; a prompt shared by `n` choices counts once.
pub fn usage(choices: &[ChoiceState], n: usize) -> UsageBody {
    let n = n.max(1);
    let prompt = choices.iter().step_by(n).map(|c| c.prompt_len).sum();
    let cached = choices.iter().step_by(n).map(|c| c.cached_tokens).sum();
    let completion = choices.iter().map(|c| c.token_ids.len()).sum();
    UsageBody::new(prompt, completion, cached)
}

/// Starts every choice; if one cannot start, the others are dropped (cancelled) and its error wins.
pub async fn start_all(
    state: &AppState,
    valid: &ValidRequest,
    deadline: TokioInstant,
) -> Result<Vec<OutputStream>, ApiError> {
    let starts = valid
        .choices
        .iter()
        .map(|req| state.router.generate(req.clone()));
    let started = tokio::time::timeout_at(deadline, futures::future::join_all(starts))
        .await
        .map_err(|_| EngineError::Timeout("no worker accepted the request in time".into()))?;
    started
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::from)
}

/// Latency bookkeeping of one request, for `/metrics`.
pub struct Clock {
    pub start: Instant,
    last: Option<Instant>,
    tokens: usize,
}

impl Clock {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            last: None,
            tokens: 0,
        }
    }

    pub fn on_tokens(&mut self, state: &AppState, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        match self.last {
            None => state.metrics.observe_ttft((now - self.start).as_secs_f64()),
            Some(last) => state
                .metrics
                .observe_itl((now - last).as_secs_f64() / n as f64),
        }
        self.last = Some(now);
        self.tokens += n;
    }

    pub fn finish(&self, state: &AppState) {
        state
            .metrics
            .observe_request(self.start.elapsed().as_secs_f64(), self.tokens);
    }
}

/// Reads one choice's stream to its end (or the deadline).
async fn collect_one(
    state: &AppState,
    mut stream: OutputStream,
    prompt_len: usize,
    deadline: TokioInstant,
    clock: &parking_lot::Mutex<Clock>,
) -> Result<ChoiceState, ApiError> {
    let mut choice = ChoiceState {
        prompt_len,
        ..Default::default()
    };
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => {
                return Err(
                    EngineError::Timeout("the request ran past --request-timeout".into()).into(),
                )
            }
            Ok(None) if choice.finish.is_some() => return Ok(choice),
            Ok(None) => {
                return Err(EngineError::Internal("the worker's stream ended early".into()).into())
            }
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(out))) => {
                clock.lock().on_tokens(state, out.token_ids.len());
                choice.absorb(&out);
                if choice.finish.is_some() {
                    return Ok(choice);
                }
            }
        }
    }
}

pub async fn respond_whole(
    state: &AppState,
    valid: ValidRequest,
    api: Api,
    streams: Vec<OutputStream>,
    start: Instant,
    deadline: TokioInstant,
) -> Result<serde_json::Value, ApiError> {
    let clock = parking_lot::Mutex::new(Clock::new(start));
    let runs = streams
        .into_iter()
        .zip(&valid.choices)
        .map(|(s, req)| collect_one(state, s, req.prompt_tokens.len(), deadline, &clock));
    let choices = futures::future::try_join_all(runs).await?;
    clock.lock().finish(state);
    let usage = usage(&choices, valid.n);
    let tok = state.tokenizer.as_deref();
    let created = unix_now();
    let body = match api {
        Api::Chat => serde_json::to_value(ChatCompletion {
            id: valid.id,
            object: "chat.completion",
            created,
            model: valid.model,
            choices: choices
                .into_iter()
                .enumerate()
                .map(|(index, c)| ChatChoice {
                    index,
                    logprobs: valid.choices[index]
                        .params
                        .logprobs
                        .map(|_| chat_logprobs(&c.logprobs, tok)),
                    finish_reason: finish_str(c.finish),
                    message: AssistantMessage {
                        role: "assistant",
                        content: c.text,
                    },
                })
                .collect(),
            usage,
        }),
        Api::Completion => serde_json::to_value(Completion {
            id: valid.id,
            object: "text_completion",
            created,
            model: valid.model,
            choices: choices
                .into_iter()
                .enumerate()
                .map(|(index, mut c)| CompletionChoice {
                    index,
                    logprobs: valid.choices[index].params.logprobs.map(|_| {
                        let lps = std::mem::take(&mut c.logprobs);
                        completion_logprobs(&lps, tok, &mut c.text_offset)
                    }),
                    finish_reason: finish_str(c.finish),
                    text: c.text,
                    token_ids: Some(c.token_ids),
                })
                .collect(),
            usage: Some(Some(usage)),
        }),
    };
    body.map_err(|e| EngineError::Internal(format!("serializing the response: {e}")).into())
}

/// A token's text, or `token_id:N` without a tokenizer (vLLM's convention).
pub fn token_text(id: u32, tok: Option<&dyn PromptTokenizer>) -> String {
    tok.and_then(|t| t.decode(&[id]).ok())
        .unwrap_or_else(|| format!("token_id:{id}"))
}

pub fn chat_logprobs(lps: &[TokenLogprob], tok: Option<&dyn PromptTokenizer>) -> ChatLogprobs {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(id, tok);
        (token.as_bytes().to_vec(), token, logprob)
    };
    ChatLogprobs {
        content: lps
            .iter()
            .map(|lp| {
                let (bytes, token, logprob) = entry(lp.token_id, lp.logprob);
                let top_logprobs = lp
                    .top
                    .iter()
                    .map(|&(id, l)| {
                        let (bytes, token, logprob) = entry(id, l);
                        ChatTopLogprob {
                            token,
                            logprob,
                            bytes,
                        }
                    })
                    .collect();
                ChatTokenLogprob {
                    token,
                    logprob,
                    bytes,
                    top_logprobs,
                }
            })
            .collect(),
    }
}

/// The legacy layout; `offset` carries `text_offset` across streamed pieces.
pub fn completion_logprobs(
    lps: &[TokenLogprob],
    tok: Option<&dyn PromptTokenizer>,
    offset: &mut usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for lp in lps {
        let token = token_text(lp.token_id, tok);
        out.text_offset.push(*offset);
        *offset += token.len();
        out.tokens.push(token);
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(
            lp.top
                .iter()
                .map(|&(id, l)| (token_text(id, tok), serde_json::Value::from(l)))
                .collect(),
        );
    }
    out
}
