//! What the step loop does with a new token: stop checks, detokenization, streaming, metrics.

use crate::engine::core::Core;
use crate::engine::sequence::{SeqId, Sink};
use crate::engine::types::{
    EngineError, EngineMetrics, FinishReason, GenerateOutput, TokenLogprob,
};
use std::time::{Duration, Instant};

const RATE_WINDOW: Duration = Duration::from_secs(5);

impl Core {
    /// Appends a sampled token, streams it, and ends the sequence when it is finished.
    pub(crate) fn emit_token(&mut self, id: SeqId, token: u32, logprob: Option<TokenLogprob>) {
        let seq = self.sched.seqs.get_mut(&id).expect("live sequence");
        seq.tokens.push(token);
        let num_generated = seq.generated().len();
        let params = seq.sampler.params();
        let (max_tokens, min_tokens) = (params.max_tokens, params.min_tokens);
        let is_stop_token = seq.sampler.is_stop_token(token);
        let mut finish = if is_stop_token {
            Some(FinishReason::Stop)
        } else if num_generated >= max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        let mut text = String::new();
        if let (Some(dec), Some(detok)) = (&self.decoder, &mut seq.detok) {
            // A stop token adds no text, but it ends the generation: flush what is pending.
            let upto = seq.tokens.len() - usize::from(is_stop_token);
            let delta = match detok.next(dec.as_ref(), &seq.tokens[..upto], finish.is_some()) {
                Ok(d) => d,
                Err(e) => {
                    let mut seq = self.sched.remove(id).expect("live sequence");
                    seq.sink.fail(EngineError::Internal(format!(
                        "detokenization failed: {e:#}"
                    )));
                    return;
                }
            };
            let (t, hit) = seq.stop_text.push(&delta, num_generated >= min_tokens);
            text = t;
            if hit {
                finish = Some(FinishReason::Stop);
            } else if finish.is_some() {
                text.push_str(&seq.stop_text.flush());
            }
        }
        let out = GenerateOutput {
            token_ids: vec![token],
            text,
            logprobs: logprob.into_iter().collect(),
            finish_reason: finish,
            usage: seq.usage(),
        };
        // Sent after this step's metrics are published, so a client that sees its request end
        // also sees its blocks freed.
        let open = match &seq.sink {
            Sink::Stream(tx) => {
                self.outbox.push((tx.clone(), out));
                !tx.is_closed()
            }
            Sink::Export(_) => true,
        };
        if finish.is_some() || !open {
            self.sched.remove(id);
        }
    }

    pub(crate) fn publish_initial_metrics(&self) {
        let mut m = self.shared.metrics.lock();
        m.kv_blocks_total = self.sched.pool.num_blocks();
    }

    pub(crate) fn publish_metrics(&mut self, generated: usize) {
        let now = Instant::now();
        if generated > 0 {
            self.recent.push_back((now, generated));
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now - *t > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        let rate = match (self.recent.front(), self.recent.len()) {
            (Some((first, _)), n) if n >= 2 => {
                let tokens: usize = self.recent.iter().skip(1).map(|(_, n)| n).sum();
                tokens as f64 / (now - *first).as_secs_f64().max(1e-6)
            }
            (Some((_, n)), _) if self.last_step_ms > 0.0 => *n as f64 / (self.last_step_ms / 1e3),
            _ => 0.0,
        };
        let stats = self.sched.pool.stats();
        *self.shared.metrics.lock() = EngineMetrics {
            waiting: self.sched.num_waiting() + self.parked.len(),
            running: self.sched.num_running(),
            kv_blocks_total: stats.total,
            kv_blocks_active: stats.active,
            prefix_hit_rate: stats.hit_rate(),
            last_step_ms: self.last_step_ms,
            generated_tokens_per_s: rate,
            steps: self.steps,
            num_preemptions: self.sched.num_preemptions,
        };
        for (tx, out) in self.outbox.drain(..) {
            let _ = tx.send(Ok(out));
        }
    }
}
