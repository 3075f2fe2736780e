//! A model's tokenizer (`tokenizer.json`) with its special tokens and chat template.

use super::chat_template::{ChatMessage, ChatTemplate};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

/// Cheap to clone; shared by the engine's detokenizers and the frontend.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    hf: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.inner.bos_token)
            .field("eos_token_ids", &self.inner.eos_token_ids)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(v))
}

/// A special token given as `"<s>"` or as an AddedToken object `{"content": "<s>", ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `eos_token_id` as an int or a list of ints (None when absent or malformed).
fn token_ids(v: Option<&Value>) -> Option<Vec<u32>> {
    match v? {
        Value::Number(n) => Some(vec![n.as_u64()? as u32]),
        Value::Array(a) => a.iter().map(|x| x.as_u64().map(|n| n as u32)).collect(),
        _ => None,
    }
}

/// `chat_template` as a string, or a list of `{name, template}` (the one named "default").
fn chat_template_source(v: Option<&Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => Ok(list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned))),
        Some(_) => bail!("tokenizer_config.json: field `chat_template` must be a string or a list"),
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json` (None if absent), `tokenizer_config.json` (special tokens, chat
    /// template; or `chat_template.jinja`), and the eos ids of `generation_config.json` or
    /// `config.json`.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let hf = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let mut source = chat_template_source(tc.get("chat_template"))?;
        let jinja = dir.join("chat_template.jinja");
        if source.is_none() && jinja.is_file() {
            source = Some(std::fs::read_to_string(&jinja)?);
        }
        let chat_template = source
            .map(|s| ChatTemplate::new(&s))
            .transpose()
            .with_context(|| format!("in the chat template of {}", dir.display()))?;
        let bos_token = token_string(tc.get("bos_token"));
        let eos_token = token_string(tc.get("eos_token"));
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let eos_token_ids = token_ids(generation.get("eos_token_id"))
            .or_else(|| token_ids(config.get("eos_token_id")))
            .or_else(|| Some(vec![hf.token_to_id(eos_token.as_deref()?)?]))
            .unwrap_or_default();
        Ok(Some(Self {
            inner: Arc::new(Inner {
                hf,
                chat_template,
                bos_token,
                eos_token,
                eos_token_ids,
            }),
        }))
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .hf
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .hf
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("cannot detokenize {} ids: {e}", ids.len()))
    }

    /// The prompt text for `messages`; encode it with `add_special_tokens = false` (the
    /// template writes the BOS token itself).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .inner
            .chat_template
            .as_ref()
            .context("this model's tokenizer has no chat template")?;
        template.render(
            messages,
            add_generation_prompt,
            self.inner.bos_token.as_deref().unwrap_or(""),
            self.inner.eos_token.as_deref().unwrap_or(""),
        )
    }

    pub fn has_chat_template(&self) -> bool {
        self.inner.chat_template.is_some()
    }

    /// Tokens that end generation.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids.clone()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos_token.as_deref()
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.hf.get_vocab_size(true)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.hf.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.hf.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer (e.g. for its streaming decoder).
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner.hf
    }
}
