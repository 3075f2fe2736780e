//! Incremental detokenization and stop strings.
//!
//! Byte-level tokenizers split multi-byte characters across tokens, and SentencePiece ones decide
//! a leading space from the token before, so a token cannot be decoded alone. As vLLM and TGI do,
//! we decode a short window twice — from `prefix_offset` to `read_offset` (already emitted) and to
//! the end — and emit the difference once it no longer ends in an incomplete character.

use anyhow::Result;

/// What the engine needs from a tokenizer: `tandem::model::Tokenizer` implements it, tests use
/// small fakes.
pub trait TokenDecoder: Send + Sync {
    fn decode(&self, ids: &[u32]) -> Result<String>;
    fn eos_token_ids(&self) -> Vec<u32>;
}

impl TokenDecoder for crate::model::Tokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        crate::model::Tokenizer::decode(self, ids, true)
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        crate::model::Tokenizer::eos_token_ids(self)
    }
}

/// How many prompt tokens before the first generated one give the decoder its context.
const CONTEXT_TOKENS: usize = 5;

#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDetokenizer {
    pub fn new(prompt_len: usize) -> Self {
        Self {
            prefix_offset: prompt_len.saturating_sub(CONTEXT_TOKENS),
            read_offset: prompt_len,
        }
    }

    /// The text that `tokens` (the whole sequence so far) add since the last call; empty while
    /// the last token ends inside a character. `flush` emits even an incomplete tail.
    pub fn next(&mut self, dec: &dyn TokenDecoder, tokens: &[u32], flush: bool) -> Result<String> {
        if self.read_offset >= tokens.len() {
            return Ok(String::new());
        }
        let prefix_text = dec.decode(&tokens[self.prefix_offset..self.read_offset])?;
        let new_text = dec.decode(&tokens[self.prefix_offset..])?;
        if new_text.len() <= prefix_text.len() && !flush {
            return Ok(String::new());
        }
        if new_text.ends_with('\u{FFFD}') && !flush {
            return Ok(String::new());
        }
        let delta = match new_text.get(prefix_text.len()..) {
            Some(d) if new_text.starts_with(&prefix_text) => d.to_string(),
            // The window's decoding changed (a normalizer rewrote it): emit by characters.
            _ => new_text.chars().skip(prefix_text.chars().count()).collect(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = tokens.len();
        Ok(delta)
    }
}

/// Generated text with stop strings: holds back a tail that could still become a stop string,
/// and cuts the text where one appears.
#[derive(Debug, Clone, Default)]
pub struct StopText {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Appends a delta; returns the text safe to emit now and whether a stop string matched
    /// (then the text ends just before it). With `check == false` (before `min_tokens`) stop
    /// strings are not looked for in this delta.
    pub fn push(&mut self, delta: &str, check: bool) -> (String, bool) {
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let search_from = self.text.len().saturating_sub(longest.saturating_sub(1));
        self.text.push_str(delta);
        if check {
            let mut hit: Option<usize> = None;
            for s in &self.stops {
                let from = floor_char_boundary(&self.text, search_from);
                if let Some(pos) = self.text[from..].find(s.as_str()) {
                    let at = from + pos;
                    hit = Some(hit.map_or(at, |h| h.min(at)));
                }
            }
            if let Some(at) = hit {
                // Text emitted before `min_tokens` allowed stops cannot be taken back.
                self.text.truncate(at.max(self.emitted));
                return (self.take(self.text.len()), true);
            }
        }
        let hold = if check { longest.saturating_sub(1) } else { 0 };
        let safe = floor_char_boundary(&self.text, self.text.len().saturating_sub(hold));
        (self.take(safe), false)
    }

    /// Everything not yet emitted (at the end of a generation).
    pub fn flush(&mut self) -> String {
        self.take(self.text.len())
    }

    fn take(&mut self, upto: usize) -> String {
        let upto = upto.max(self.emitted);
        let out = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        out
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
