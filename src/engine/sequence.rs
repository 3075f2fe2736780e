//! One request inside the engine: its tokens, KV blocks, sampling state and where outputs go.

use crate::engine::detokenize::{IncrementalDetokenizer, StopText};
use crate::engine::remote::PrefillExport;
use crate::engine::sampler::SeqSampler;
use crate::engine::types::{EngineError, GenerateOutput, GenerateRequest, Usage};
use crate::kv::prefix::block_hash;
use crate::kv::BlockPool;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

pub type SeqId = u64;

pub type OutputSender = mpsc::UnboundedSender<Result<GenerateOutput, EngineError>>;

/// Where a sequence's results go.
pub enum Sink {
    /// A client stream (`generate`).
    Stream(OutputSender),
    /// A prefill-only request (`prefill_and_export`): one answer, then the sequence ends.
    Export(Option<oneshot::Sender<Result<PrefillExport, EngineError>>>),
}

impl Sink {
    /// The receiver is gone: the client cancelled.
    pub fn is_closed(&self) -> bool {
        match self {
            Sink::Stream(tx) => tx.is_closed(),
            Sink::Export(Some(tx)) => tx.is_closed(),
            Sink::Export(None) => true,
        }
    }

    /// Answers a prefill-only request (no-op for a stream).
    pub fn send_export(&mut self, result: Result<PrefillExport, EngineError>) {
        if let Sink::Export(tx) = self {
            if let Some(tx) = tx.take() {
                let _ = tx.send(result);
            }
        }
    }

    pub fn fail(&mut self, err: EngineError) {
        match self {
            Sink::Stream(tx) => {
                let _ = tx.send(Err(err));
            }
            Sink::Export(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Err(err));
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqState {
    Waiting,
    Running,
    /// Waiting for a remote prefill to fill its blocks (decode side of disaggregation).
    Parked {
        deadline: Instant,
    },
}

pub struct Sequence {
    pub id: SeqId,
    pub request_id: String,
    pub prompt_len: usize,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens whose KV is in `blocks`, or queued to be written there by a launched step (the
    /// steps run in order, so a later step reads it).
    pub num_computed: usize,
    /// Tokens after `tokens` sampled by a launched step the engine has not read yet (async
    /// scheduling: at most one when a step is scheduled, taken from the last step on the device).
    pub pending: usize,
    /// This sequence's batch index in the last step it ran in (where its pending token is).
    pub last_row: usize,
    pub blocks: Vec<u32>,
    /// Hash chain of the leading full blocks already offered to the prefix cache.
    pub hashes: Vec<u64>,
    /// Prompt tokens found in the prefix cache at first admission.
    pub cached_tokens: usize,
    pub admitted_once: bool,
    pub state: SeqState,
    pub sampler: SeqSampler,
    pub detok: Option<IncrementalDetokenizer>,
    pub stop_text: StopText,
    pub sink: Sink,
    /// Still counted in the handle's queue-length counter.
    pub counted_in_queue: bool,
}

impl Sequence {
    pub fn new(
        id: SeqId,
        req: GenerateRequest,
        sampler: SeqSampler,
        detok: bool,
        sink: Sink,
    ) -> Self {
        let prompt_len = req.prompt_tokens.len();
        Self {
            id,
            request_id: req.id,
            prompt_len,
            tokens: req.prompt_tokens,
            num_computed: 0,
            pending: 0,
            last_row: 0,
            blocks: vec![],
            hashes: vec![],
            cached_tokens: 0,
            admitted_once: false,
            state: SeqState::Waiting,
            stop_text: StopText::new(req.params.stop.clone()),
            sampler,
            detok: detok.then(|| IncrementalDetokenizer::new(prompt_len)),
            sink,
            counted_in_queue: false,
        }
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() + self.pending - self.num_computed
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated().len(),
            cached_tokens: self.cached_tokens,
        }
    }

    /// Offers newly completed full blocks (of known tokens) to the prefix cache.
    pub fn commit_full_blocks(&mut self, pool: &mut BlockPool) {
        let bs = pool.block_size();
        let known = self.num_computed.min(self.tokens.len());
        while (self.hashes.len() + 1) * bs <= known {
            let i = self.hashes.len();
            let parent = self.hashes.last().copied().unwrap_or(0);
            let h = block_hash(parent, &self.tokens[i * bs..(i + 1) * bs]);
            pool.commit(self.blocks[i], h);
            self.hashes.push(h);
        }
    }

    /// Gives back every block and forgets the computed KV (preemption, failure, end).
    pub fn release_blocks(&mut self, pool: &mut BlockPool) {
        pool.release(&self.blocks);
        self.blocks.clear();
        self.hashes.clear();
        self.num_computed = 0;
    }
}
