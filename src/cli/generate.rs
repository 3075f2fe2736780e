//! `tandem generate`: one prompt, run directly on a backend in this process (prefill in chunks,
//! then one token per step) — the smallest end-to-end check of a model.

use super::common::ModelArgs;
use crate::backend::factory::create_backend;
use crate::backend::{Backend, Batch, DeviceSampling, Emit, SeqChunk, SeqOutput};
use crate::model::{load_weights, ModelFiles};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt as token ids, comma separated (e.g. `1,2,3`).
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    pub prompt_tokens: Option<Vec<u32>>,
    /// The prompt as text (needs the model's tokenizer; BOS is added as the tokenizer says).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 1.0 = off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler's random numbers (only matters when temperature > 0).
    #[arg(long, default_value_t = 0)]
    pub sampling_seed: u64,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Prefill at most this many prompt tokens per step (default: the whole prompt at once).
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What one `generate` run produced.
#[derive(Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// "stop" (end-of-sequence token) or "length" (max tokens)
    pub finish_reason: &'static str,
    pub timing: Timing,
}

#[derive(Debug, serde::Serialize)]
pub struct Timing {
    pub load_ms: f64,
    /// Prefill until the first generated token.
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub decode_tokens_per_s: f64,
}

pub fn run(args: Args) -> Result<()> {
    let g = generate(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&g)?);
    } else {
        match &g.text {
            Some(text) => println!("{text}"),
            None => println!("{:?}", g.tokens),
        }
        eprintln!(
            "{} prompt tokens, {} generated ({}); prefill {:.1} ms, decode {:.1} tokens/s",
            g.prompt_tokens.len(),
            g.tokens.len(),
            g.finish_reason,
            g.timing.prefill_ms,
            g.timing.decode_tokens_per_s
        );
    }
    Ok(())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

pub fn generate(args: &Args) -> Result<Generation> {
    let load_start = Instant::now();
    let files = ModelFiles::resolve(&args.model.model)?;
    let prompt = match (&args.prompt_tokens, &args.prompt) {
        (Some(ids), None) => ids.clone(),
        (None, Some(text)) => files
            .tokenizer
            .as_ref()
            .with_context(|| {
                format!(
                    "--prompt needs a tokenizer, and {} has no tokenizer.json; pass --prompt-tokens",
                    files.dir.display()
                )
            })?
            .encode(text, true)?,
        (None, None) => bail!("give a prompt: --prompt TEXT or --prompt-tokens 1,2,3"),
        (Some(_), Some(_)) => bail!("give either --prompt or --prompt-tokens, not both"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let config = &files.config;
    let total = prompt.len() + args.max_tokens;
    if total > config.max_position_embeddings {
        bail!(
            "the prompt ({} tokens) plus --max-tokens {} exceeds the model's context of {} positions",
            prompt.len(),
            args.max_tokens,
            config.max_position_embeddings
        );
    }
    if args.temperature < 0.0 || !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    let block_size = args.model.block_size;
    if block_size == 0 {
        bail!("--block-size must be positive");
    }
    let chunk = args.max_num_batched_tokens.unwrap_or(prompt.len());
    if chunk == 0 {
        bail!("--max-num-batched-tokens must be positive");
    }
    let weights = load_weights(&files, args.model.load_format, args.model.seed)?;
    let num_blocks = total.div_ceil(block_size);
    let mut backend = create_backend(args.model.device, config, &weights, block_size, num_blocks)?;
    drop(weights);
    let load_ms = ms(load_start);

    let mut eos = config.eos_token_ids.clone();
    if let Some(t) = &files.tokenizer {
        eos.extend(t.eos_token_ids());
    }
    let mut sampler = Sampler {
        rng: rand_chacha::ChaCha8Rng::seed_from_u64(args.sampling_seed),
        args,
    };
    let block_table: Vec<u32> = (0..num_blocks as u32).collect();

    let prefill_start = Instant::now();
    let mut first = None;
    for start in (0..prompt.len()).step_by(chunk) {
        let end = (start + chunk).min(prompt.len());
        let emit = if end == prompt.len() {
            sampler.emit()
        } else {
            Emit::Nothing
        };
        let tokens = prompt[start..end].to_vec();
        first = step(backend.as_mut(), tokens, start, &block_table, emit)?;
    }
    let prefill_ms = ms(prefill_start);

    let decode_start = Instant::now();
    let mut tokens = vec![first.context("the backend returned no token for the prompt")?];
    let mut finish_reason = "length";
    loop {
        let last = *tokens.last().unwrap_or(&0);
        if !args.ignore_eos && eos.contains(&last) {
            finish_reason = "stop";
            break;
        }
        if tokens.len() == args.max_tokens {
            break;
        }
        let pos = prompt.len() + tokens.len() - 1;
        let next = step(
            backend.as_mut(),
            vec![last],
            pos,
            &block_table,
            sampler.emit(),
        )?;
        tokens.push(next.context("the backend returned no token")?);
    }
    let decode_ms = ms(decode_start);
    let decoded = tokens.len() - 1;

    let text = match &files.tokenizer {
        Some(t) => Some(t.decode(&tokens, true)?),
        None => None,
    };
    Ok(Generation {
        prompt_tokens: prompt,
        tokens,
        text,
        finish_reason,
        timing: Timing {
            load_ms,
            prefill_ms,
            decode_ms,
            decode_tokens_per_s: if decoded > 0 {
                decoded as f64 / (decode_ms / 1e3)
            } else {
                0.0
            },
        },
    })
}

/// Runs one chunk of the single sequence; returns the sampled token when one was asked for.
fn step(
    backend: &mut dyn Backend,
    tokens: Vec<u32>,
    start_pos: usize,
    block_table: &[u32],
    emit: Emit,
) -> Result<Option<u32>> {
    let chunk = SeqChunk {
        tokens,
        start_pos,
        block_table: block_table.to_vec(),
        emit,
    };
    let out = backend.step(&Batch { seqs: vec![chunk] })?;
    Ok(match out.into_iter().next() {
        Some(SeqOutput::Token(t)) => Some(t),
        _ => None,
    })
}

struct Sampler<'a> {
    rng: rand_chacha::ChaCha8Rng,
    args: &'a Args,
}

impl Sampler<'_> {
    fn emit(&mut self) -> Emit {
        Emit::Sample(DeviceSampling {
            temperature: self.args.temperature,
            top_k: self.args.top_k,
            top_p: self.args.top_p,
            uniform: self.rng.random::<f32>(),
        })
    }
}
