//! Turns an OpenAI request into `ValidRequest`: checked fields, tokenized prompts, one
//! `GenerateRequest` per choice. Later code never re-checks.

use super::error::ApiError;
use super::openai::{
    ChatCompletionRequest, CompletionRequest, MessageContent, Prompt, SamplingFields,
};
use super::tokenizer::{ChatTurn, PromptTokenizer};
use crate::engine::types::{EngineError, GenerateRequest, SamplingParams};

/// Limits the frontend enforces before a request reaches a worker.
#[derive(Debug, Clone)]
pub struct Limits {
    pub served_model_name: String,
    pub max_model_len: usize,
    /// Most choices per request (`n` times the number of prompts).
    pub max_choices: usize,
}

#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub id: String,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices per prompt: choices `k*n .. (k+1)*n` share prompt k.
    pub n: usize,
    /// One request per choice, in choice-index order.
    pub choices: Vec<GenerateRequest>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

pub fn check_model(requested: Option<&str>, limits: &Limits) -> Result<String, ApiError> {
    match requested {
        None | Some("") => Ok(limits.served_model_name.clone()),
        Some(m) if m == limits.served_model_name => Ok(m.to_string()),
        Some(m) => Err(ApiError::ModelNotFound(m.to_string())),
    }
}

pub fn validate_chat(
    req: ChatCompletionRequest,
    tokenizer: Option<&dyn PromptTokenizer>,
    limits: &Limits,
) -> Result<ValidRequest, ApiError> {
    let model = check_model(req.model.as_deref(), limits)?;
    let tokenizer = tokenizer.ok_or_else(|| {
        bad(
            "chat completions need a tokenizer with a chat template, and this model has none; \
             use /v1/completions with token ids",
        )
    })?;
    if req.messages.is_empty() {
        return Err(bad("`messages` must not be empty"));
    }
    let mut turns = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(MessageContent::Text(s)) => s,
            Some(MessageContent::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        (kind, _) => {
                            return Err(bad(format!(
                                "messages[{i}]: content part `{kind}` is not supported"
                            )))
                        }
                    }
                }
                s
            }
        };
        turns.push(ChatTurn {
            role: m.role,
            content,
        });
    }
    let text = tokenizer
        .apply_chat_template(&turns)
        .map_err(|e| bad(format!("chat template: {e:#}")))?;
    let prompt = tokenizer
        .encode(&text, false)
        .map_err(|e| bad(format!("tokenizer: {e:#}")))?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (false, Some(n)) if n > 0 => return Err(bad("`top_logprobs` needs `logprobs: true`")),
        (false, _) => None,
        (true, n) => Some(n.unwrap_or(0)),
    };
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let choices = expand(
        &id,
        vec![prompt],
        &req.sampling,
        max_tokens,
        logprobs,
        limits,
    )?;
    Ok(ValidRequest {
        id,
        model,
        stream: req.stream,
        include_usage,
        n: req.sampling.n.unwrap_or(1),
        choices,
    })
}

pub fn validate_completion(
    req: CompletionRequest,
    tokenizer: Option<&dyn PromptTokenizer>,
    limits: &Limits,
) -> Result<ValidRequest, ApiError> {
    let model = check_model(req.model.as_deref(), limits)?;
    if req.echo {
        return Err(bad("`echo` is not supported"));
    }
    if req.suffix.is_some() {
        return Err(bad("`suffix` is not supported"));
    }
    let encode = |text: &str| -> Result<Vec<u32>, ApiError> {
        let t = tokenizer.ok_or_else(|| {
            bad("this model has no tokenizer: send the prompt as token ids (a list of integers)")
        })?;
        t.encode(text, true)
            .map_err(|e| bad(format!("tokenizer: {e:#}")))
    };
    let prompts = match req.prompt {
        Prompt::Text(s) => vec![encode(&s)?],
        Prompt::Texts(v) => v.iter().map(|s| encode(s)).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![ids],
        Prompt::TokenLists(v) => v,
    };
    if prompts.is_empty() {
        return Err(bad("`prompt` must not be empty"));
    }
    if let Some(n) = req.logprobs {
        if n > 20 {
            return Err(bad(format!("`logprobs` must be at most 20, got {n}")));
        }
    }
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let choices = expand(
        &id,
        prompts,
        &req.sampling,
        req.max_tokens,
        req.logprobs,
        limits,
    )?;
    Ok(ValidRequest {
        id,
        model,
        stream: req.stream,
        include_usage,
        n: req.sampling.n.unwrap_or(1),
        choices,
    })
}

/// One `GenerateRequest` per (prompt, n) pair; choice index = prompt index * n + i.
fn expand(
    id: &str,
    prompts: Vec<Vec<u32>>,
    fields: &SamplingFields,
    max_tokens: Option<usize>,
    logprobs: Option<usize>,
    limits: &Limits,
) -> Result<Vec<GenerateRequest>, ApiError> {
    let n = fields.n.unwrap_or(1);
    if n == 0 || n * prompts.len() > limits.max_choices {
        return Err(bad(format!(
            "`n` times the number of prompts must be between 1 and {}, got {}",
            limits.max_choices,
            n * prompts.len()
        )));
    }
    let base = sampling_params(fields, logprobs)?;
    let mut out = Vec::with_capacity(n * prompts.len());
    for (p, prompt) in prompts.into_iter().enumerate() {
        if prompt.is_empty() {
            return Err(bad(format!("prompt {p} is empty")));
        }
        let max_tokens = check_length(prompt.len(), max_tokens, limits.max_model_len)?;
        if base.min_tokens > max_tokens {
            return Err(bad(format!(
                "`min_tokens` ({}) must not exceed `max_tokens` ({max_tokens})",
                base.min_tokens
            )));
        }
        for i in 0..n {
            let mut params = base.clone();
            params.max_tokens = max_tokens;
            // Distinct seeds so that n seeded samples differ, yet stay reproducible.
            params.seed = base.seed.map(|s| s.wrapping_add(i as u64));
            out.push(GenerateRequest {
                id: format!("{id}-{}", p * n + i),
                prompt_tokens: prompt.clone(),
                params,
            });
        }
    }
    Ok(out)
}

/// Resolves `max_tokens` (default: the rest of the context) and checks it fits.
fn check_length(
    prompt_len: usize,
    max_tokens: Option<usize>,
    max_model_len: usize,
) -> Result<usize, ApiError> {
    let too_long = |max_tokens| {
        ApiError::Engine(EngineError::PromptTooLong {
            prompt_tokens: prompt_len,
            max_tokens,
            max_model_len,
        })
    };
    match max_tokens {
        Some(0) => Err(bad("`max_tokens` must be at least 1")),
        Some(m) if prompt_len + m > max_model_len => Err(too_long(m)),
        Some(m) => Ok(m),
        None if prompt_len >= max_model_len => Err(too_long(1)),
        None => Ok(max_model_len - prompt_len),
    }
}

fn sampling_params(
    f: &SamplingFields,
    logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let nv = f.nvext.clone().unwrap_or_default();
    let mut p = SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        top_k: 0,
        top_p: f.top_p.unwrap_or(d.top_p),
        min_p: nv.min_p.or(f.min_p).unwrap_or(d.min_p),
        seed: f.seed,
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: nv
            .repetition_penalty
            .or(f.repetition_penalty)
            .unwrap_or(1.0),
        max_tokens: 0,
        min_tokens: f.min_tokens.unwrap_or(0),
        ignore_eos: nv.ignore_eos.or(f.ignore_eos).unwrap_or(false),
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        stop: f.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        logprobs,
    };
    if nv.greed_sampling == Some(true) {
        p.temperature = 0.0;
    }
    let top_k = nv.top_k.or(f.top_k).unwrap_or(0);
    if top_k < -1 {
        return Err(bad(format!(
            "`top_k` must be -1 (off), 0 (off) or positive, got {top_k}"
        )));
    }
    p.top_k = top_k.max(0) as usize;
    let in_range = |name: &str, v: f32, lo: f32, hi: f32| {
        if v.is_finite() && v >= lo && v <= hi {
            Ok(())
        } else {
            Err(bad(format!("`{name}` must be in [{lo}, {hi}], got {v}")))
        }
    };
    in_range("temperature", p.temperature, 0.0, 2.0)?;
    in_range("top_p", p.top_p, 0.0, 1.0)?;
    if p.top_p == 0.0 {
        return Err(bad("`top_p` must be greater than 0"));
    }
    in_range("min_p", p.min_p, 0.0, 1.0)?;
    in_range("presence_penalty", p.presence_penalty, -2.0, 2.0)?;
    in_range("frequency_penalty", p.frequency_penalty, -2.0, 2.0)?;
    if !(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0) {
        return Err(bad(format!(
            "`repetition_penalty` must be positive, got {}",
            p.repetition_penalty
        )));
    }
    if p.logprobs.is_some_and(|n| n > 20) {
        return Err(bad("`top_logprobs` must be at most 20"));
    }
    if p.stop.iter().any(|s| s.is_empty()) {
        return Err(bad("`stop` strings must not be empty"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::tokenizer::ByteTokenizer;

    fn limits() -> Limits {
        Limits {
            served_model_name: "m".into(),
            max_model_len: 32,
            max_choices: 8,
        }
    }

    fn completion(body: &str) -> Result<ValidRequest, ApiError> {
        validate_completion(
            serde_json::from_str(body).unwrap(),
            Some(&ByteTokenizer),
            &limits(),
        )
    }

    #[test]
    fn defaults_max_tokens_to_rest_of_context() {
        let v = completion(r#"{"prompt":[1,2,3,4]}"#).unwrap();
        assert_eq!(v.choices[0].params.max_tokens, 28);
        assert_eq!(v.model, "m");
    }

    #[test]
    fn too_long_names_both_numbers() {
        let e = completion(r#"{"prompt":[1,2,3,4],"max_tokens":30}"#).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("32") && msg.contains("30") && msg.contains('4'),
            "{msg}"
        );
        assert_eq!(e.status().as_u16(), 400);
    }

    #[test]
    fn nvext_overrides_top_level() {
        let v = completion(
            r#"{"prompt":"hi","ignore_eos":false,"top_k":3,"nvext":{"ignore_eos":true,"top_k":7}}"#,
        )
        .unwrap();
        assert!(v.choices[0].params.ignore_eos);
        assert_eq!(v.choices[0].params.top_k, 7);
    }

    #[test]
    fn several_prompts_and_n_expand_in_order() {
        let v = completion(r#"{"prompt":[[5],[6,7]],"n":2,"max_tokens":2,"seed":9}"#).unwrap();
        let firsts: Vec<u32> = v.choices.iter().map(|c| c.prompt_tokens[0]).collect();
        assert_eq!(firsts, [5, 5, 6, 6]);
        assert_eq!(v.choices[1].params.seed, Some(10));
        assert!(completion(r#"{"prompt":[[5],[6]],"n":5}"#).is_err());
    }

    #[test]
    fn rejects_bad_values() {
        for body in [
            r#"{"prompt":"x","temperature":3}"#,
            r#"{"prompt":"x","top_p":0}"#,
            r#"{"prompt":"x","top_k":-2}"#,
            r#"{"prompt":"x","max_tokens":0}"#,
            r#"{"prompt":"x","max_tokens":2,"min_tokens":3}"#,
            r#"{"prompt":[]}"#,
            r#"{"prompt":"x","echo":true}"#,
            r#"{"prompt":"x","model":"other"}"#,
        ] {
            assert!(completion(body).is_err(), "{body}");
        }
    }

    #[test]
    fn text_needs_a_tokenizer() {
        let req = serde_json::from_str(r#"{"prompt":"hi"}"#).unwrap();
        let e = validate_completion(req, None, &limits()).unwrap_err();
        assert!(e.to_string().contains("token ids"));
        let chat =
            serde_json::from_str(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert!(validate_chat(chat, None, &limits())
            .unwrap_err()
            .to_string()
            .contains("tokenizer"));
    }

    #[test]
    fn chat_applies_template() {
        let chat = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"logprobs":true,"top_logprobs":2}"#,
        )
        .unwrap();
        let v = validate_chat(chat, Some(&ByteTokenizer), &limits()).unwrap();
        let text = ByteTokenizer.decode(&v.choices[0].prompt_tokens).unwrap();
        assert_eq!(text, "<user>hi\n<assistant>");
        assert_eq!(v.choices[0].params.logprobs, Some(2));
    }
}
