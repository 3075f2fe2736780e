//! Continuous batching with chunked prefill.
//!
//! Each step gets a token budget (`max_num_batched_tokens`). Running sequences go first —
//! decodes (one token each), then unfinished prefill chunks — then waiting sequences are admitted
//! first come first served until the budget, `max_num_seqs`, or the free blocks run out; the queue
//! is never overtaken. When a running sequence needs a block and none is free, the youngest running
//! sequence is preempted: its blocks are freed and it goes back to the queue in arrival order,
//! keeping its generated tokens, to be recomputed later (cheaply, when its blocks are still in the
//! prefix cache). Parked sequences (waiting for a remote prefill) hold blocks but are not scheduled.

use crate::engine::sequence::{SeqId, SeqState, Sequence};
use crate::kv::{block_hashes, BlockPool};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// `num_tokens` of sequence `id` run this step, starting at its `num_computed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    pub num_tokens: usize,
}

pub struct Scheduler {
    pub pool: BlockPool,
    pub seqs: HashMap<SeqId, Sequence>,
    /// Both in arrival (id) order.
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    max_num_batched_tokens: usize,
    max_num_seqs: usize,
    chunked_prefill: bool,
    /// Without chunking, a prompt that did not fit beside the decodes gets the next step first.
    prefill_first: bool,
    /// Requests not yet admitted, shared with the handle for `QueueFull`.
    queued: Arc<AtomicUsize>,
    pub num_preemptions: u64,
}

impl Scheduler {
    pub fn new(
        pool: BlockPool,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
        chunked_prefill: bool,
        queued: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: vec![],
            max_num_batched_tokens,
            max_num_seqs,
            chunked_prefill,
            prefill_first: false,
            queued,
            num_preemptions: 0,
        }
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Adds a sequence (in `seq.state`: waiting, running, or parked outside both queues).
    pub fn insert(&mut self, seq: Sequence) {
        let id = seq.id;
        let state = seq.state;
        self.seqs.insert(id, seq);
        match state {
            SeqState::Waiting => insert_sorted(&mut self.waiting, id),
            SeqState::Running => {
                let at = self.running.partition_point(|&x| x < id);
                self.running.insert(at, id);
            }
            SeqState::Parked { .. } => {}
        }
    }

    /// Moves a known sequence to the waiting queue or to running (after a remote prefill).
    pub fn set_state(&mut self, id: SeqId, state: SeqState) {
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        self.detach(id, seq.state);
        let mut seq = seq;
        seq.state = state;
        self.insert(seq);
    }

    /// Takes a sequence out of the engine, freeing its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        self.detach(id, seq.state);
        seq.release_blocks(&mut self.pool);
        if seq.counted_in_queue {
            seq.counted_in_queue = false;
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        Some(seq)
    }

    fn detach(&mut self, id: SeqId, state: SeqState) {
        match state {
            SeqState::Waiting => self.waiting.retain(|&x| x != id),
            SeqState::Running => self.running.retain(|&x| x != id),
            SeqState::Parked { .. } => {}
        }
    }

    /// Frees a running sequence's blocks and requeues it (recompute later).
    fn preempt(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).expect("running sequence");
        seq.release_blocks(&mut self.pool);
        self.num_preemptions += 1;
        tracing::debug!(seq = id, "preempted: out of KV blocks");
        self.set_state(id, SeqState::Waiting);
    }

    /// Picks this step's work. Allocates the blocks it needs; never exceeds the token budget.
    pub fn schedule(&mut self) -> Vec<Scheduled> {
        let mut out: Vec<Scheduled> = vec![];
        let mut budget = self.max_num_batched_tokens;
        if std::mem::take(&mut self.prefill_first) {
            self.admit_waiting(&mut out, &mut budget);
            self.schedule_running(&mut out, &mut budget);
        } else {
            let waiting_before = self.waiting.len();
            self.schedule_running(&mut out, &mut budget);
            // Blocks ran out this step: admitting more would only thrash.
            if self.waiting.len() == waiting_before {
                self.admit_waiting(&mut out, &mut budget);
            }
        }
        out
    }

    fn schedule_running(&mut self, out: &mut Vec<Scheduled>, budget: &mut usize) {
        let decodes = self
            .running
            .iter()
            .filter(|id| self.seqs[id].num_uncomputed() == 1);
        let prefills = self
            .running
            .iter()
            .filter(|id| self.seqs[id].num_uncomputed() > 1);
        let order: Vec<SeqId> = decodes.chain(prefills).copied().collect();
        for id in order {
            if *budget == 0 {
                break;
            }
            if !self.running.contains(&id) || out.iter().any(|s| s.id == id) {
                continue; // preempted (or already taken) earlier in this step
            }
            let remaining = self.seqs[&id].num_uncomputed();
            let n = remaining.min(*budget);
            if n < remaining && !self.chunked_prefill {
                continue;
            }
            loop {
                let seq = &self.seqs[&id];
                let need =
                    blocks_for(seq.num_computed + n, self.pool.block_size()) - seq.blocks.len();
                if let Some(new) = self.pool.allocate(need) {
                    self.seqs.get_mut(&id).unwrap().blocks.extend(new);
                    out.push(Scheduled { id, num_tokens: n });
                    *budget -= n;
                    break;
                }
                let victim = *self.running.last().expect("id itself is running");
                if let Some(i) = out.iter().position(|s| s.id == victim) {
                    *budget += out.remove(i).num_tokens;
                }
                self.preempt(victim);
                if victim == id {
                    break;
                }
            }
        }
    }

    fn admit_waiting(&mut self, out: &mut Vec<Scheduled>, budget: &mut usize) {
        while *budget > 0 && self.running.len() < self.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(n) = self.try_allocate(id, *budget) else {
                break;
            };
            out.push(Scheduled { id, num_tokens: n });
            *budget -= n;
            let seq = self.seqs.get_mut(&id).unwrap();
            if std::mem::take(&mut seq.counted_in_queue) {
                self.queued.fetch_sub(1, Ordering::Relaxed);
            }
            self.set_state(id, SeqState::Running);
        }
    }

    /// Gives a waiting sequence its cached prefix and the blocks of its first chunk; returns the
    /// chunk length, or `None` (nothing taken) when it does not fit now.
    fn try_allocate(&mut self, id: SeqId, budget: usize) -> Option<usize> {
        let bs = self.pool.block_size();
        let seq = &self.seqs[&id];
        debug_assert!(seq.blocks.is_empty());
        if seq.pending > 0 {
            return None; // preempted while its token was computed: wait for that token
        }
        let len = seq.tokens.len();
        // At least the last token is computed: its logits give the next token.
        let hashes = if self.pool.prefix_caching() {
            block_hashes(&seq.tokens[..(len - 1) / bs * bs], bs)
        } else {
            vec![]
        };
        let hits = self.pool.lookup(&hashes);
        let cached = hits.len() * bs;
        let remaining = len - cached;
        let n = remaining.min(budget);
        if n < remaining && !self.chunked_prefill {
            self.prefill_first = true;
            return None;
        }
        let need = blocks_for(cached + n, bs) - hits.len();
        if !self.pool.can_allocate(need, &hits) {
            return None;
        }
        self.pool.acquire(&hits);
        let new = self.pool.allocate(need).expect("checked");
        let seq = self.seqs.get_mut(&id).unwrap();
        if !std::mem::replace(&mut seq.admitted_once, true) {
            seq.cached_tokens = cached;
            self.pool.record_lookup(seq.prompt_len, cached);
        }
        seq.hashes = hashes[..hits.len()].to_vec();
        seq.blocks = hits;
        seq.blocks.extend(new);
        seq.num_computed = cached;
        Some(n)
    }

    /// Panics when block references and block tables disagree (run after every step in debug
    /// builds, so every engine test checks it).
    pub fn check_invariants(&self) {
        self.pool.check_invariants();
        let mut refs: HashMap<u32, u32> = HashMap::new();
        for seq in self.seqs.values() {
            for &b in &seq.blocks {
                *refs.entry(b).or_default() += 1;
            }
            let bs = self.pool.block_size();
            assert!(
                seq.blocks.len() * bs >= seq.num_computed,
                "seq {}: table too short",
                seq.id
            );
            if seq.state == SeqState::Waiting {
                assert!(seq.blocks.is_empty(), "waiting seq {} holds blocks", seq.id);
            }
        }
        for b in 0..self.pool.num_blocks() as u32 {
            let expect = refs.get(&b).copied().unwrap_or(0);
            assert_eq!(
                self.pool.ref_count(b),
                expect,
                "block {b}: ref count vs tables"
            );
        }
        assert!(self.running.len() + self.waiting.len() <= self.seqs.len());
        assert!(self
            .waiting
            .iter()
            .zip(self.waiting.iter().skip(1))
            .all(|(a, b)| a < b));
    }
}

pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

fn insert_sorted(q: &mut VecDeque<SeqId>, id: SeqId) {
    let at = q.partition_point(|&x| x < id);
    q.insert(at, id);
}
