//! Helpers shared by the engine tests (`mod engine_support;` in each file).
#![allow(dead_code)]

use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::engine::types::{
    EngineError, FinishReason, GenerateRequest, SamplingParams, TokenLogprob, Usage,
};
use tandem::engine::{EngineHandle, TokenDecoder};
use tandem::worker::OutputStream;

pub const VOCAB: usize = 1024;

/// Greedy, exactly `max_tokens` tokens.
pub fn greedy(id: &str, prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    let params = SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    GenerateRequest {
        id: id.into(),
        prompt_tokens: prompt,
        params,
    }
}

#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: Option<FinishReason>,
    pub usage: Usage,
    pub logprobs: Vec<TokenLogprob>,
    pub pieces: usize,
}

pub async fn collect(mut stream: OutputStream) -> Result<Collected, EngineError> {
    let mut c = Collected::default();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("no output for 20 s")
    {
        let out = item?;
        assert!(c.finish.is_none(), "output after the last piece");
        c.tokens.extend(&out.token_ids);
        c.text.push_str(&out.text);
        c.logprobs.extend(out.logprobs);
        c.finish = out.finish_reason;
        c.usage = out.usage;
        c.pieces += 1;
    }
    assert!(c.finish.is_some(), "stream ended without a finish reason");
    Ok(c)
}

pub async fn run(engine: &EngineHandle, req: GenerateRequest) -> Collected {
    collect(engine.generate(req).expect("accepted"))
        .await
        .expect("completed")
}

/// Waits until the engine is idle and every KV block is free again.
pub fn assert_all_blocks_free(engine: &EngineHandle) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = engine.metrics();
        if m.kv_blocks_active == 0 && m.running == 0 && m.waiting == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "blocks not freed: {m:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A byte-level tokenizer: ids 0..256 are single bytes (so multi-byte characters span tokens),
/// 256.. decode to nothing (special tokens); `eos` is an EOS id.
pub struct ByteTokenizer {
    pub eos: Vec<u32>,
}

impl TokenDecoder for ByteTokenizer {
    fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        let bytes: Vec<u8> = ids.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }
}

pub fn byte_tokenizer(eos: &[u32]) -> Option<Arc<dyn TokenDecoder>> {
    Some(Arc::new(ByteTokenizer { eos: eos.to_vec() }))
}

pub fn bytes_of(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

/// A simple deterministic pseudo-random generator for test workloads.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(VOCAB as u64) as u32).collect()
    }
}
