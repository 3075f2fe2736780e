//! A backend for tests that checks the engine's KV bookkeeping instead of running a model.
//!
//! Its "KV cache" stores the token id written at each slot of each block; a step writes the chunk's
//! tokens through the block table, reads the whole context back through it (failing on a slot
//! never written), and its logits are a deterministic function of that entire context. Any
//! block-table, prefix-cache or preemption bug therefore changes its outputs, and
//! `MockBackend::reference_greedy` gives the exact expected tokens.

use crate::backend::sampling;
use crate::backend::{
    Backend, Batch, Emit, KvDtype, KvLayout, PreviousToken, SeqOutput, StepQueue,
};
use crate::model::config::LlamaConfig;
use anyhow::{bail, ensure, Result};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const EMPTY: u32 = u32::MAX;

/// One sequence of one step as the backend saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkRecord {
    pub start_pos: usize,
    pub tokens: Vec<u32>,
    pub emit: bool,
}

pub type StepLog = Arc<Mutex<Vec<Vec<ChunkRecord>>>>;

pub struct MockBackend {
    config: LlamaConfig,
    block_size: usize,
    slots: Vec<u32>,
    log: StepLog,
    step_delay: Duration,
    fail_at_step: Option<usize>,
    panic_at_step: Option<usize>,
    steps: usize,
    queue: StepQueue,
    /// Tokens taken from the previous step's samples (async scheduling).
    previous_taken: Arc<AtomicUsize>,
    queued_steps: bool,
}

impl MockBackend {
    pub fn new(vocab_size: usize, block_size: usize, num_blocks: usize) -> Self {
        Self {
            config: mock_config(vocab_size, &[]),
            block_size,
            slots: vec![EMPTY; num_blocks * block_size],
            log: StepLog::default(),
            step_delay: Duration::ZERO,
            fail_at_step: None,
            panic_at_step: None,
            steps: 0,
            queue: StepQueue::default(),
            previous_taken: Arc::default(),
            queued_steps: false,
        }
    }

    /// Declares an EOS id in the model config.
    pub fn with_eos(mut self, eos: u32) -> Self {
        self.config = mock_config(self.config.vocab_size, &[eos]);
        self
    }

    /// Says it queues steps, as a GPU does (the engine then schedules asynchronously; the mock
    /// still computes a step when it is finished).
    pub fn with_queued_steps(mut self) -> Self {
        self.queued_steps = true;
        self
    }

    pub fn with_step_delay(mut self, delay: Duration) -> Self {
        self.step_delay = delay;
        self
    }

    /// The `n`-th step (0-based) returns an error.
    pub fn failing_at_step(mut self, n: usize) -> Self {
        self.fail_at_step = Some(n);
        self
    }

    /// The `n`-th step (0-based) panics.
    pub fn panicking_at_step(mut self, n: usize) -> Self {
        self.panic_at_step = Some(n);
        self
    }

    /// Every step's chunks, for budget and order checks.
    /// How many input tokens came from the previous step's samples so far.
    pub fn previous_taken(&self) -> Arc<AtomicUsize> {
        self.previous_taken.clone()
    }

    pub fn log(&self) -> StepLog {
        self.log.clone()
    }

    /// The logits after reading `context` (a pure function of all of it).
    pub fn logits_for(context: &[u32], vocab_size: usize) -> Vec<f32> {
        let bytes: Vec<u8> = context.iter().flat_map(|t| t.to_le_bytes()).collect();
        let h = xxh3_64_with_seed(&bytes, 0x7a6e);
        (0..vocab_size as u64)
            .map(|i| (xxh3_64_with_seed(&i.to_le_bytes(), h) % 10_000) as f32 / 2_500.0)
            .collect()
    }

    /// The greedy continuation of `prompt`, computed directly (no cache, no batching).
    pub fn reference_greedy(
        prompt: &[u32],
        max_tokens: usize,
        vocab_size: usize,
        stop: &[u32],
    ) -> Vec<u32> {
        let mut ctx = prompt.to_vec();
        let mut out = vec![];
        while out.len() < max_tokens {
            let t = sampling::greedy(&Self::logits_for(&ctx, vocab_size));
            ctx.push(t);
            out.push(t);
            if stop.contains(&t) {
                break;
            }
        }
        out
    }

    fn slot(&self, table: &[u32], pos: usize) -> Result<usize> {
        let Some(&b) = table.get(pos / self.block_size) else {
            bail!(
                "position {pos} is beyond the block table ({} blocks)",
                table.len()
            );
        };
        ensure!(
            (b as usize) * self.block_size < self.slots.len(),
            "block {b} out of range"
        );
        Ok(b as usize * self.block_size + pos % self.block_size)
    }
}

impl Backend for MockBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
            block_size: self.block_size,
            dtype: KvDtype::F32,
        }
    }

    fn num_kv_blocks(&self) -> usize {
        self.slots.len() / self.block_size
    }

    fn step(&mut self, batch: &Batch) -> Result<Vec<SeqOutput>> {
        if self.fail_at_step == Some(self.steps) {
            bail!("injected failure at step {}", self.steps);
        }
        if self.panic_at_step == Some(self.steps) {
            panic!("injected panic at step {}", self.steps);
        }
        self.steps += 1;
        std::thread::sleep(self.step_delay);
        let mut outputs = vec![];
        for chunk in &batch.seqs {
            for (i, &t) in chunk.tokens.iter().enumerate() {
                ensure!(
                    (t as usize) < self.config.vocab_size,
                    "token {t} outside the vocabulary"
                );
                let s = self.slot(&chunk.block_table, chunk.start_pos + i)?;
                self.slots[s] = t;
            }
            let end = chunk.start_pos + chunk.tokens.len();
            let mut context = Vec::with_capacity(end);
            for pos in 0..end {
                let t = self.slots[self.slot(&chunk.block_table, pos)?];
                ensure!(t != EMPTY, "position {pos} was read before it was written");
                context.push(t);
            }
            let vocab = self.config.vocab_size;
            outputs.push(match &chunk.emit {
                Emit::Nothing => SeqOutput::Nothing,
                Emit::Logits => SeqOutput::Logits(Self::logits_for(&context, vocab)),
                Emit::Sample(s) => {
                    SeqOutput::Token(sampling::sample(&Self::logits_for(&context, vocab), s))
                }
            });
        }
        self.log.lock().push(
            batch
                .seqs
                .iter()
                .map(|c| ChunkRecord {
                    start_pos: c.start_pos,
                    tokens: c.tokens.clone(),
                    emit: c.emit != Emit::Nothing,
                })
                .collect(),
        );
        Ok(outputs)
    }

    fn launch_step(&mut self, batch: &Batch, previous: &[PreviousToken]) -> Result<()> {
        self.previous_taken
            .fetch_add(previous.len(), Ordering::Relaxed);
        self.queue.launch(batch, previous);
        Ok(())
    }

    fn step_queue(&mut self) -> Option<&mut StepQueue> {
        Some(&mut self.queue)
    }

    fn queues_steps(&self) -> bool {
        self.queued_steps
    }

    /// K holds the token ids (as u32 bits), V their bitwise complement.
    fn export_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(blocks.len() * self.kv_layout().block_bytes());
        for &b in blocks {
            let base = self.slot(&[b], 0)?;
            let slots = &self.slots[base..base + self.block_size];
            slots
                .iter()
                .for_each(|t| out.extend_from_slice(&t.to_le_bytes()));
            slots
                .iter()
                .for_each(|t| out.extend_from_slice(&(!t).to_le_bytes()));
        }
        Ok(out)
    }

    fn import_blocks(&mut self, blocks: &[u32], data: &[u8]) -> Result<()> {
        let bb = self.kv_layout().block_bytes();
        ensure!(
            data.len() == blocks.len() * bb,
            "expected {} bytes, got {}",
            blocks.len() * bb,
            data.len()
        );
        for (&b, bytes) in blocks.iter().zip(data.chunks_exact(bb)) {
            let base = self.slot(&[b], 0)?;
            for i in 0..self.block_size {
                let k = u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
                let v_at = 4 * (self.block_size + i);
                let v = u32::from_le_bytes(bytes[v_at..v_at + 4].try_into().unwrap());
                ensure!(v == !k, "corrupt KV data in block {b}");
                self.slots[base + i] = k;
            }
        }
        Ok(())
    }
}

fn mock_config(vocab_size: usize, eos: &[u32]) -> LlamaConfig {
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": vocab_size,
        "max_position_embeddings": 4096, "eos_token_id": eos,
    });
    LlamaConfig::from_json(&json).expect("valid mock config")
}
