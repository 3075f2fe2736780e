//! What the frontend needs from a tokenizer. A trait so HTTP tests can run with a tiny fake one;
//! the model's tokenizer implements it.

use anyhow::Result;

/// One chat turn after the OpenAI message has been flattened to text.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

pub trait PromptTokenizer: Send + Sync {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>>;
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// The prompt text of a conversation, ending with the assistant's turn header.
    fn apply_chat_template(&self, turns: &[ChatTurn]) -> Result<String>;
}

/// The model's Hugging Face tokenizer and chat template.
impl PromptTokenizer for crate::model::Tokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        crate::model::Tokenizer::encode(self, text, add_special)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        crate::model::Tokenizer::decode(self, ids, false)
    }

    fn apply_chat_template(&self, turns: &[ChatTurn]) -> Result<String> {
        let messages: Vec<crate::model::ChatMessage> = turns
            .iter()
            .map(|t| crate::model::ChatMessage::new(&t.role, &t.content))
            .collect();
        crate::model::Tokenizer::apply_chat_template(self, &messages, true)
    }
}

/// One token per byte (id = byte value + 3; ids 0..3 special), with a trivial chat template.
/// Used by tests that need text without a real model.
#[derive(Debug, Clone, Default)]
pub struct ByteTokenizer;

impl PromptTokenizer for ByteTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let bos = add_special.then_some(1);
        Ok(bos
            .into_iter()
            .chain(text.bytes().map(|b| b as u32 + 3))
            .collect())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&i| i >= 3)
            .map(|&i| ((i - 3) % 256) as u8)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn apply_chat_template(&self, turns: &[ChatTurn]) -> Result<String> {
        let mut s = String::new();
        for t in turns {
            s.push_str(&format!("<{}>{}\n", t.role, t.content));
        }
        s.push_str("<assistant>");
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips() {
        let t = ByteTokenizer;
        let ids = t.encode("héllo", true).unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(t.decode(&ids).unwrap(), "héllo");
    }
}
