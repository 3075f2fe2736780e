//! What a sweep drives: an OpenAI endpoint over HTTP, or engines in this process.

use super::prompts::Prompt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// One streamed piece of a response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chunk {
    /// Text delta (may be empty, e.g. the role-only first chunk of a chat stream).
    pub text: String,
    /// Tokens in this piece when the target knows them exactly (in-process engines).
    pub tokens: Option<usize>,
    /// `usage.completion_tokens`, when the server reports it.
    pub completion_tokens: Option<usize>,
}

impl Chunk {
    /// Whether this piece carries generated output (TTFT is measured to the first such piece).
    pub fn has_output(&self) -> bool {
        !self.text.is_empty() || self.tokens.is_some_and(|n| n > 0)
    }
}

pub type ChunkStream = BoxStream<'static, anyhow::Result<Chunk>>;

/// A load target. The sweep takes its timestamps around these calls, so every target is
/// measured the same way.
pub trait LoadTarget: Send + Sync {
    /// Sends one streaming request asking for exactly `osl` output tokens.
    fn stream(
        &self,
        prompt: &Prompt,
        osl: usize,
    ) -> BoxFuture<'static, anyhow::Result<ChunkStream>>;
}
