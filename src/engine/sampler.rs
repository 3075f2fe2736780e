//! Turning logits into the next token: penalties, temperature, min-p, top-k, top-p, a seeded draw,
//! and top-N logprobs. One request's random stream is its own (ChaCha8 from its seed), and exactly
//! one number is drawn per generated token whatever the path, so a seeded request gives the same
//! tokens however it is batched, preempted, or split between a prefill and a decode worker.
//!
//! Order (as vLLM): repetition, frequency and presence penalties; `min_tokens` suppression of EOS
//! and stop ids; logprobs of the result; then temperature, min-p, top-k, top-p, and an
//! inverse-CDF draw (the last three are `backend::sampling`, the device path's own function).
//! Temperature 0 is greedy (argmax, lowest id on ties).

use crate::backend::{sampling, DeviceSampling, Emit};
use crate::engine::types::{SamplingParams, TokenLogprob};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Per-request sampling state.
#[derive(Debug, Clone)]
pub struct SeqSampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// EOS ids (empty when `ignore_eos`) and stop token ids: they end a generation.
    stop_ids: Vec<u32>,
    /// The uniform drawn for the token being computed now.
    pending_uniform: f32,
}

impl SeqSampler {
    pub fn new(params: &SamplingParams, eos_token_ids: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let mut stop_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend_from_slice(eos_token_ids);
        }
        Self {
            params: params.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            stop_ids,
            pending_uniform: 0.0,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn is_stop_token(&self, token: u32) -> bool {
        self.stop_ids.contains(&token)
    }

    /// Draws this token's random number and says what the backend must return for it:
    /// a token sampled on the device when only temperature / top-k / top-p apply, else logits.
    pub fn next_emit(&mut self, num_generated: usize) -> Emit {
        self.pending_uniform = self.rng.random::<f32>();
        let p = &self.params;
        let needs_logits = p.min_p > 0.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || p.repetition_penalty != 1.0
            || p.logprobs.is_some()
            || (num_generated < p.min_tokens && !self.stop_ids.is_empty());
        if needs_logits {
            Emit::Logits
        } else {
            Emit::Sample(DeviceSampling {
                temperature: p.temperature,
                top_k: p.top_k,
                top_p: p.top_p,
                uniform: self.pending_uniform,
            })
        }
    }

    /// Skips one draw: the token was sampled elsewhere (a remote prefill worker).
    pub fn skip_draw(&mut self) {
        let _ = self.rng.random::<f32>();
    }

    /// Samples from full logits (the `Emit::Logits` path).
    pub fn sample_logits(
        &self,
        mut logits: Vec<f32>,
        prompt: &[u32],
        generated: &[u32],
    ) -> (u32, Option<TokenLogprob>) {
        let p = &self.params;
        apply_penalties(&mut logits, prompt, generated, p);
        if generated.len() < p.min_tokens {
            for &t in &self.stop_ids {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let logprobs = p.logprobs.map(|n| (log_softmax(&logits), n));
        let token = sample(
            &logits,
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p,
            self.pending_uniform,
        );
        let logprob = logprobs.map(|(lp, n)| TokenLogprob {
            token_id: token,
            logprob: lp[token as usize],
            top: top_n(&lp, n),
        });
        (token, logprob)
    }
}

/// Repetition penalty over prompt and output tokens (divide positive logits, multiply negative
/// ones); frequency and presence penalties over output tokens (subtract count × f, and p once).
pub fn apply_penalties(logits: &mut [f32], prompt: &[u32], generated: &[u32], p: &SamplingParams) {
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in prompt.iter().chain(generated) {
            if let Some(s) = seen.get_mut(t as usize) {
                if !*s {
                    *s = true;
                    let l = &mut logits[t as usize];
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
}

pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&l| l - log_sum).collect()
}

/// The `n` best (token, logprob), best first, lowest id first on ties.
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        logprobs[b as usize]
            .total_cmp(&logprobs[a as usize])
            .then(a.cmp(&b))
    });
    idx.into_iter()
        .take(n)
        .map(|t| (t, logprobs[t as usize]))
        .collect()
}

pub fn argmax(logits: &[f32]) -> u32 {
    sampling::greedy(logits)
}

/// One token from `logits`: temperature, then min-p (drop tokens below `min_p` × the top
/// probability), then the device path's top-k, top-p and inverse-CDF draw with `uniform`, so the
/// host and device paths pick the same token. Temperature 0 = argmax.
pub fn sample(
    logits: &[f32],
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    uniform: f32,
) -> u32 {
    let device = DeviceSampling {
        temperature,
        top_k,
        top_p,
        uniform,
    };
    if temperature <= 0.0 || min_p <= 0.0 {
        return sampling::sample(logits, &device);
    }
    // p_i / p_max = exp((l_i - l_max) / T) >= min_p  <=>  l_i >= l_max + T ln(min_p)
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let floor = max + temperature * min_p.ln();
    let masked: Vec<f32> = logits
        .iter()
        .map(|&l| if l >= floor { l } else { f32::NEG_INFINITY })
        .collect();
    sampling::sample(&masked, &device)
}
