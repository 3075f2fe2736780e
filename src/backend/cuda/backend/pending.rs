//! Launched steps whose outputs the host has not read yet (async scheduling, `backend/steps.rs`).
//!
//! A step's plan goes up from pinned memory and its sampled tokens come back into pinned memory,
//! both queued on the stream, so a launch never waits for the GPU; `finish` waits on the step's
//! event alone. Two host slots take turns: at most two steps are pending (the one computing and
//! the next one queued behind it). The plan buffer, the sampled tokens and the logits on the
//! device are each one buffer, reused in stream order: step n + 1's plan copy and sampling queue
//! behind step n's kernels and step n's copy of its tokens. Logits are read by `finish` with a
//! plain copy, so a step after one that returns logits waits for that one to finish.

use super::super::device::{Event, PinnedI32};
use super::super::meta::StepPlan;
use super::CudaBackend;
use crate::backend::{PreviousToken, SeqOutput};
use anyhow::{bail, ensure, Context, Result};
use std::collections::VecDeque;

/// Pinned host buffers of one pending step.
struct HostSlot {
    plan: PinnedI32,
    tokens: PinnedI32,
    done: Event,
}

/// What `finish` needs of a launched step.
struct Launched {
    slot: usize,
    num_seqs: usize,
    emit_seqs: Vec<usize>,
    emit_logits: Vec<bool>,
}

#[derive(Default)]
pub(super) struct PendingSteps {
    slots: Vec<HostSlot>,
    queue: VecDeque<Launched>,
    last_slot: usize,
    /// Batch index of each emitting row of the last launched step (where its tokens are).
    last_emit_seqs: Vec<usize>,
    last_emit_logits: Vec<bool>,
}

impl PendingSteps {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

impl CudaBackend {
    /// Queues the step `plan`; the chunks in `previous` start with a token the last launched
    /// step sampled (`chunk_starts[i]`: flat index of chunk i's first token).
    pub(super) fn launch_plan(
        &mut self,
        plan: &StepPlan,
        previous: &[PreviousToken],
        chunk_starts: &[usize],
    ) -> Result<()> {
        let n = plan.num_tokens;
        let ne = plan.emit_seqs.len();
        ensure!(
            n <= self.opts.max_num_batched_tokens,
            "step of {n} tokens exceeds --max-num-batched-tokens {}",
            self.opts.max_num_batched_tokens
        );
        ensure!(
            ne <= self.opts.max_num_seqs,
            "step of {ne} sequences exceeds --max-num-seqs {}",
            self.opts.max_num_seqs
        );
        let pending = &self.pending;
        ensure!(pending.queue.len() < 2, "two steps are pending already");
        if let Some(last) = pending.queue.back() {
            ensure!(
                !last.emit_logits.iter().any(|&l| l),
                "a step was launched before the logits of the previous one were read"
            );
        }
        // Where each previous token comes from: the emitting row of the last step.
        let mut pairs = Vec::with_capacity(2 * previous.len());
        for p in previous {
            let row = pending.last_emit_seqs.iter().position(|&s| s == p.row);
            let Some(row) = row.filter(|&r| !pending.last_emit_logits[r]) else {
                bail!("the previous step sampled no token for its row {}", p.row);
            };
            let start = chunk_starts
                .get(p.seq)
                .context("previous token of a missing chunk")?;
            pairs.extend([*start as i32, row as i32]);
        }
        let words = plan.packed.len() + pairs.len();
        if words * 4 > self.ws.meta.bytes {
            self.gpu.sync()?; // a pending step may still read the old buffer
            self.ws.meta = self.gpu.alloc(words * 8)?;
            // Graphs read the plan from the old buffer.
            self.graphs.clear();
        }
        let slot = if self.pending.queue.is_empty() {
            0
        } else {
            1 - self.pending.last_slot
        };
        while self.pending.slots.len() <= slot {
            let tokens = PinnedI32::new(self.opts.max_num_seqs)?;
            let plan = PinnedI32::new(self.ws.meta.bytes / 4)?;
            let done = Event::new()?;
            self.pending.slots.push(HostSlot { plan, tokens, done });
        }
        let host = &mut self.pending.slots[slot];
        if host.plan.len() < words {
            host.plan = PinnedI32::new(self.ws.meta.bytes / 4)?;
        }
        let staged = host.plan.as_mut_slice();
        staged[..plan.packed.len()].copy_from_slice(&plan.packed);
        staged[plan.packed.len()..words].copy_from_slice(&pairs);
        self.gpu
            .copy_to_queued(&self.ws.meta, &mut host.plan, words)?;
        self.mark("start")?;
        if !previous.is_empty() {
            let meta = self.ws.meta.ptr;
            let m = |off: usize| meta + 4 * off as u64;
            let (tokens, sampled) = (m(plan.at.tokens), self.ws.tokens_out.ptr);
            self.ops().take_previous_tokens(
                tokens,
                sampled,
                m(plan.packed.len()),
                previous.len(),
            )?;
        }
        if ne == 0 {
            self.launch_layers(plan)?;
        } else if self.graphable(plan) {
            self.launch_decode(plan)?;
        } else {
            self.queue_step(plan)?;
        }
        let host = &mut self.pending.slots[slot];
        if ne > 0 {
            self.gpu
                .copy_from_queued(&mut host.tokens, &self.ws.tokens_out, ne)?;
        }
        host.done.record(self.gpu.cu_stream())?;
        self.pending.last_slot = slot;
        self.pending.last_emit_seqs = plan.emit_seqs.clone();
        self.pending.last_emit_logits = plan.emit_logits.clone();
        self.pending.queue.push_back(Launched {
            slot,
            num_seqs: plan.num_seqs,
            emit_seqs: plan.emit_seqs.clone(),
            emit_logits: plan.emit_logits.clone(),
        });
        Ok(())
    }

    /// Waits for the oldest pending step and returns its outputs.
    pub(super) fn finish_pending(&mut self) -> Result<Vec<SeqOutput>> {
        let step = self
            .pending
            .queue
            .pop_front()
            .context("no step is pending")?;
        let host = &mut self.pending.slots[step.slot];
        host.done.synchronize()?;
        let tokens = host.tokens.as_mut_slice()[..step.emit_seqs.len()].to_vec();
        if self.pending.queue.is_empty() {
            // Every profiling mark has completed.
            self.profiler.collect()?;
        }
        let mut out = vec![SeqOutput::Nothing; step.num_seqs];
        let (logits, v) = match &self.tp {
            Some(tp) => (tp.full_logits(), tp.vocab),
            None => (&self.ws.logits, self.config.vocab_size),
        };
        for (r, &s) in step.emit_seqs.iter().enumerate() {
            out[s] = if step.emit_logits[r] {
                let mut row = vec![0f32; v];
                self.gpu.copy_from(logits, r * v * 4, &mut row)?;
                SeqOutput::Logits(row)
            } else {
                SeqOutput::Token(tokens[r] as u32)
            };
        }
        Ok(out)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Launched steps may still copy into the pinned buffers freed with the backend.
        if !self.pending.is_empty() {
            let _ = self.gpu.bind();
            let _ = self.gpu.sync();
        }
    }
}
