//! Streaming responses: OpenAI chunks over server-sent events, ending with `data: [DONE]`.
//! A failure after the headers went out becomes an `{"error": ...}` event. Dropping the body
//! (client gone) drops every choice's stream, which cancels them in the engines.

use super::error::ApiError;
use super::generate::*;
use super::openai::*;
use super::validate::ValidRequest;
use super::AppState;
use crate::engine::types::{EngineError, GenerateOutput};
use crate::worker::OutputStream;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio::time::Instant as TokioInstant;

/// Status recorded in `/metrics` for a stream the client abandoned (nginx's convention).
const CLIENT_CLOSED: u16 = 499;

/// Records the stream's final status in `/metrics`, whichever way it ends.
struct StatusOnDrop {
    state: Arc<AppState>,
    status: u16,
}

impl Drop for StatusOnDrop {
    fn drop(&mut self) {
        self.state.metrics.record_status(self.status);
    }
}

/// Builds the JSON of one chunk for choice `index`.
struct ChunkWriter {
    api: Api,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl ChunkWriter {
    fn event(&self, choice_json: serde_json::Value, usage: Option<UsageBody>) -> Event {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        };
        let mut chunk = serde_json::json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": if choice_json.is_null() { serde_json::json!([]) } else { serde_json::json!([choice_json]) },
        });
        if self.include_usage {
            chunk["usage"] = serde_json::to_value(usage).unwrap_or_default();
        }
        Event::default().data(chunk.to_string())
    }

    fn role_event(&self, index: usize) -> Event {
        let delta = ChatDelta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        let choice = ChatChunkChoice {
            index,
            delta,
            logprobs: None,
            finish_reason: None,
        };
        self.event(serde_json::to_value(choice).unwrap_or_default(), None)
    }

    fn piece_event(
        &self,
        state: &AppState,
        index: usize,
        choice: &mut ChoiceState,
        out: &GenerateOutput,
        logprobs: bool,
    ) -> Event {
        let tok = state.tokenizer.as_deref();
        let finish_reason = finish_str(out.finish_reason);
        let value = match self.api {
            Api::Chat => serde_json::to_value(ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: None,
                    content: Some(out.text.clone()),
                },
                logprobs: logprobs.then(|| chat_logprobs(&out.logprobs, tok)),
                finish_reason,
            }),
            Api::Completion => serde_json::to_value(CompletionChoice {
                index,
                text: out.text.clone(),
                logprobs: logprobs
                    .then(|| completion_logprobs(&out.logprobs, tok, &mut choice.text_offset)),
                finish_reason,
                token_ids: Some(out.token_ids.clone()),
            }),
        };
        self.event(value.unwrap_or_default(), None)
    }
}

fn error_event(e: &ApiError) -> Event {
    Event::default().data(serde_json::to_string(&e.body()).unwrap_or_default())
}

pub fn respond_stream(
    state: Arc<AppState>,
    valid: ValidRequest,
    api: Api,
    streams: Vec<OutputStream>,
    start: Instant,
    deadline: TokioInstant,
) -> Response {
    let writer = ChunkWriter {
        api,
        id: valid.id.clone(),
        model: valid.model.clone(),
        created: unix_now(),
        include_usage: valid.include_usage,
    };
    let events = async_stream::stream! {
        let mut status = StatusOnDrop { state: state.clone(), status: CLIENT_CLOSED };
        let mut clock = Clock::new(start);
        let mut choices: Vec<ChoiceState> = valid
            .choices
            .iter()
            .map(|r| ChoiceState { prompt_len: r.prompt_tokens.len(), ..Default::default() })
            .collect();
        let want_logprobs: Vec<bool> = valid.choices.iter().map(|r| r.params.logprobs.is_some()).collect();
        if api == Api::Chat {
            for index in 0..choices.len() {
                yield Ok::<_, Infallible>(writer.role_event(index));
            }
        }
        let mut merged = stream::select_all(
            streams.into_iter().enumerate().map(|(i, s)| s.map(move |item| (i, item))),
        );
        let mut open = choices.len();
        let mut failure: Option<ApiError> = None;
        while open > 0 {
            let next = tokio::time::timeout_at(deadline, merged.next()).await;
            let (index, item) = match next {
                Err(_) => {
                    failure = Some(EngineError::Timeout("the request ran past --request-timeout".into()).into());
                    break;
                }
                Ok(None) => {
                    failure = Some(EngineError::Internal("a worker's stream ended early".into()).into());
                    break;
                }
                Ok(Some(x)) => x,
            };
            match item {
                Err(e) => {
                    failure = Some(e.into());
                    break;
                }
                Ok(out) => {
                    clock.on_tokens(&state, out.token_ids.len());
                    let choice = &mut choices[index];
                    let was_done = choice.finish.is_some();
                    choice.absorb(&out);
                    yield Ok(writer.piece_event(&state, index, choice, &out, want_logprobs[index]));
                    if !was_done && choice.finish.is_some() {
                        open -= 1;
                    }
                }
            }
        }
        // The other choices' streams are dropped (cancelled) here if one failed.
        drop(merged);
        match failure {
            Some(e) => {
                status.status = e.status().as_u16();
                tracing::warn!(request = %writer.id, error = %e, "stream failed");
                yield Ok(error_event(&e));
            }
            None => {
                status.status = 200;
                clock.finish(&state);
                if writer.include_usage {
                    yield Ok(writer.event(serde_json::Value::Null, Some(usage(&choices, valid.n))));
                }
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
