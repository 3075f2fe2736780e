//! Streaming detokenization: text for each new token, correct across multi-token characters
//! and tokenizers whose spacing depends on the previous token (TGI's prefix/read offsets).

use super::tokenizer::Tokenizer;
use anyhow::Result;

/// Ids of the prompt kept as context so the first generated token gets its leading space right.
const PROMPT_CONTEXT: usize = 5;

pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    ids: Vec<u32>,
    /// Start of the ids decoded as context for the next piece.
    prefix_offset: usize,
    /// End of the ids whose text was already returned.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Tokenizer, prompt: &[u32], skip_special_tokens: bool) -> Self {
        let ids = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..].to_vec();
        let read_offset = ids.len();
        Self {
            tokenizer,
            ids,
            prefix_offset: 0,
            read_offset,
            skip_special_tokens,
        }
    }

    /// The text completed by `id` (empty while a character is still incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, self.skip_special_tokens);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = decode(&self.ids[self.prefix_offset..])?;
        if text.len() <= prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new) = text.get(prefix.len()..) else {
            return Ok(String::new());
        };
        let new = new.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.compact();
        Ok(new)
    }

    /// Drops ids before `prefix_offset`, which no later step decodes.
    fn compact(&mut self) {
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
    }
}
