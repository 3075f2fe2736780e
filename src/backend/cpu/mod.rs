//! The CPU reference backend on candle-core: every weight converted to f32 once, a paged f32 KV
//! cache, and FP8 linears that compute exactly the GPU's function (per-token e4m3 activations,
//! per-channel weight scales). Slow but simple; the GPU backend is checked against it.

mod attention;
mod kv_cache;
pub mod linear;
mod llama;

use super::sampling;
use super::{Backend, Batch, Emit, KvDtype, KvLayout, SeqOutput, StepQueue};
use crate::model::config::LlamaConfig;
use crate::model::weights::LlamaWeights;
use anyhow::{bail, ensure, Result};
use kv_cache::PagedKvCache;
use llama::CpuLlama;

pub struct CpuBackend {
    config: LlamaConfig,
    model: CpuLlama,
    cache: PagedKvCache,
    queue: StepQueue,
}

impl CpuBackend {
    pub fn new(
        config: &LlamaConfig,
        weights: &LlamaWeights,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        ensure!(block_size > 0, "--block-size must be positive");
        ensure!(num_blocks > 0, "the KV cache needs at least one block");
        Ok(Self {
            config: config.clone(),
            model: CpuLlama::new(config, weights)?,
            cache: PagedKvCache::new(
                config.num_hidden_layers,
                num_blocks,
                config.num_key_value_heads,
                block_size,
                config.head_dim,
            ),
            queue: StepQueue::default(),
        })
    }

    /// Rejects a batch the forward could not run, before anything is written.
    fn validate(&self, batch: &Batch) -> Result<()> {
        let c = &self.config;
        let bs = self.cache.block_size;
        for (i, s) in batch.seqs.iter().enumerate() {
            ensure!(
                !s.tokens.is_empty(),
                "sequence {i} of the batch has no tokens"
            );
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                bail!(
                    "sequence {i}: token id {t} is out of range (vocab size {})",
                    c.vocab_size
                );
            }
            let end = s.start_pos + s.tokens.len();
            ensure!(
                end <= c.max_position_embeddings,
                "sequence {i}: positions up to {} exceed max_position_embeddings {}",
                end - 1,
                c.max_position_embeddings
            );
            let needed = end.div_ceil(bs);
            ensure!(
                s.block_table.len() >= needed,
                "sequence {i}: {end} positions need {needed} KV blocks of {bs}, the block table has {}",
                s.block_table.len()
            );
            if let Some(&b) = s.block_table[..needed]
                .iter()
                .find(|&&b| b as usize >= self.cache.num_blocks)
            {
                bail!(
                    "sequence {i}: KV block id {b} is out of range (the cache has {} blocks)",
                    self.cache.num_blocks
                );
            }
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        KvLayout {
            num_layers: self.config.num_hidden_layers,
            num_kv_heads: self.cache.num_kv_heads,
            head_dim: self.cache.head_dim,
            block_size: self.cache.block_size,
            dtype: KvDtype::F32,
        }
    }

    fn num_kv_blocks(&self) -> usize {
        self.cache.num_blocks
    }

    fn step(&mut self, batch: &Batch) -> Result<Vec<SeqOutput>> {
        if batch.seqs.is_empty() {
            return Ok(vec![]);
        }
        self.validate(batch)?;
        let logits = self.model.forward(&batch.seqs, &mut self.cache)?;
        Ok(batch
            .seqs
            .iter()
            .zip(logits)
            .map(|(s, l)| match (&s.emit, l) {
                (Emit::Logits, Some(l)) => SeqOutput::Logits(l),
                (Emit::Sample(p), Some(l)) => SeqOutput::Token(sampling::sample(&l, p)),
                _ => SeqOutput::Nothing,
            })
            .collect())
    }

    fn step_queue(&mut self) -> Option<&mut StepQueue> {
        Some(&mut self.queue)
    }

    fn export_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>> {
        self.cache.export(blocks)
    }

    fn import_blocks(&mut self, blocks: &[u32], data: &[u8]) -> Result<()> {
        self.cache.import(blocks, data)
    }
}
