//! Launching a scheduled step and reading its outputs back.
//!
//! With async scheduling (the default) the step loop launches step n + 1 before it reads step n:
//! a sequence whose token step n samples counts it as `pending`, so the scheduler gives it its
//! next decode at once, and the backend takes that token from the device (`backend::steps`). The
//! sequence's KV counts as computed from its launch on (steps run in order). No pending token is
//! made for a sequence's last token (`max_tokens`), for host-sampled logits, or for a prefill-only
//! request: those wait for the step. A sequence that stops on a sampled stop token has had one
//! more step launched; its output is dropped (the sequence is gone when that step finishes).

use crate::backend::{Batch, Emit, PreviousToken, SeqChunk, SeqOutput};
use crate::engine::core::Core;
use crate::engine::scheduler::Scheduled;
use crate::engine::sequence::{SeqId, Sink};
use std::time::Instant;

/// A launched step: what each of its sequences was to produce.
pub(crate) struct InFlight {
    rows: Vec<Row>,
    launched_at: Instant,
    /// Some row returns logits: the backend may reuse their buffer in the next step.
    pub has_logits: bool,
}

struct Row {
    id: SeqId,
    emit: Emit,
    /// The sampled token was counted as the sequence's pending token.
    pending: bool,
}

impl Core {
    /// Builds and launches the batch of `scheduled`.
    pub(crate) fn launch(&mut self, scheduled: &[Scheduled]) -> Result<InFlight, String> {
        let mut batch = Batch::default();
        let mut previous = vec![];
        let mut rows = Vec::with_capacity(scheduled.len());
        for (i, s) in scheduled.iter().enumerate() {
            let seq = self.sched.seqs.get_mut(&s.id).expect("scheduled sequence");
            let (start, known) = (seq.num_computed, seq.tokens.len());
            let end = start + s.num_tokens;
            debug_assert!(seq.pending <= 1 && end <= known + seq.pending);
            let mut tokens = seq.tokens[start.min(known)..end.min(known)].to_vec();
            if end > known {
                // The last step's sample, still on the device; 0 holds its place.
                tokens.push(0);
                previous.push(PreviousToken {
                    seq: i,
                    row: seq.last_row,
                });
            }
            let emit = if end == known + seq.pending {
                seq.sampler.next_emit(seq.generated().len() + seq.pending)
            } else {
                Emit::Nothing
            };
            let generated_after = seq.generated().len() + seq.pending + 1;
            let pending = self.async_scheduling
                && matches!(emit, Emit::Sample(_))
                && matches!(seq.sink, Sink::Stream(_))
                && generated_after < seq.sampler.params().max_tokens;
            seq.pending += usize::from(pending);
            seq.num_computed = end;
            seq.last_row = i;
            batch.seqs.push(SeqChunk {
                tokens,
                start_pos: start,
                block_table: seq.blocks.clone(),
                emit: emit.clone(),
            });
            rows.push(Row {
                id: s.id,
                emit,
                pending,
            });
        }
        self.backend
            .launch_step(&batch, &previous)
            .map_err(|e| format!("backend step failed: {e:#}"))?;
        Ok(InFlight {
            has_logits: rows.iter().any(|r| r.emit == Emit::Logits),
            rows,
            launched_at: Instant::now(),
        })
    }

    /// Waits for a launched step and hands its tokens on; returns the number generated.
    pub(crate) fn finish(&mut self, step: InFlight) -> Result<usize, String> {
        let outputs = self
            .backend
            .finish_step()
            .map_err(|e| format!("backend step failed: {e:#}"))?;
        // A queued step's time on the device starts when the one before it ends.
        let now = Instant::now();
        let began = self
            .last_finish
            .map_or(step.launched_at, |t| t.max(step.launched_at));
        self.last_step_ms = (now - began).as_secs_f64() * 1e3;
        self.last_finish = Some(now);
        self.steps += 1;
        if outputs.len() != step.rows.len() {
            return Err(format!(
                "backend returned {} outputs for {} sequences",
                outputs.len(),
                step.rows.len()
            ));
        }
        let mut generated = 0;
        for (row, out) in step.rows.into_iter().zip(outputs) {
            // Gone: cancelled, or ended by the token of the step before.
            let Some(seq) = self.sched.seqs.get_mut(&row.id) else {
                continue;
            };
            seq.pending -= usize::from(row.pending);
            if self.sched.pool.prefix_caching() {
                seq.commit_full_blocks(&mut self.sched.pool);
            }
            let (token, logprob) = match (&row.emit, out) {
                (Emit::Nothing, _) => continue,
                (_, SeqOutput::Token(t)) => (t, None),
                (_, SeqOutput::Logits(l)) => {
                    seq.sampler
                        .sample_logits(l, &seq.tokens[..seq.prompt_len], seq.generated())
                }
                (_, SeqOutput::Nothing) => {
                    return Err("backend returned no output for a sequence that needed one".into())
                }
            };
            if token as usize >= self.vocab_size {
                return Err(format!(
                    "backend produced token {token} outside the vocabulary"
                ));
            }
            generated += 1;
            self.on_token(row.id, token, logprob);
        }
        Ok(generated)
    }

    /// Finishes the launched step, if any, and publishes its outputs.
    pub(crate) fn drain(&mut self) -> Result<(), String> {
        if let Some(step) = self.in_flight.take() {
            let generated = self.finish(step)?;
            self.publish_metrics(generated);
        }
        Ok(())
    }
}
