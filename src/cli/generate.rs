//! `tandem generate`: one prompt through an in-process engine on the chosen device; prints the
//! text (or token ids when the model has no tokenizer) and, on stderr, TTFT and decode speed.

use super::common::{EngineArgs, ModelArgs};
use crate::backend::factory::{build_backend, resolve_device};
use crate::engine::types::{FinishReason, GenerateRequest, SamplingParams};
use crate::engine::Engine;
use crate::model::{ChatMessage, ModelFiles};
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use std::io::Write;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt text (tokenized with the model's tokenizer).
    #[arg(long, conflicts_with = "prompt_tokens")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids (models without a tokenizer, dummy benchmarks).
    #[arg(long, value_delimiter = ',')]
    pub prompt_tokens: Option<Vec<u32>>,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the request's sampler.
    #[arg(long)]
    pub sampling_seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens (fixed-length benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object (prompt_tokens, tokens, text, finish_reason, timing) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What one `generate` run produced (the `--json` output).
#[derive(Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    /// Present when the model has a tokenizer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// "stop" or "length"
    pub finish_reason: Option<FinishReason>,
    pub timing: Timing,
}

#[derive(Debug, serde::Serialize)]
pub struct Timing {
    pub load_ms: f64,
    /// Request start until the first generated token.
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub decode_tokens_per_s: f64,
}

pub fn run(args: Args) -> Result<()> {
    let files = ModelFiles::resolve(&args.model.model)?;
    let prompt_tokens = match (&args.prompt, &args.prompt_tokens) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            let tok = files
                .tokenizer
                .as_ref()
                .with_context(|| {
                    format!(
                        "--prompt needs a tokenizer, and {} has no tokenizer.json; pass --prompt-tokens",
                        files.dir.display()
                    )
                })?;
            if args.chat {
                let text = tok.apply_chat_template(&[ChatMessage::new("user", text)], true)?;
                tok.encode(&text, false)?
            } else {
                tok.encode(text, true)?
            }
        }
        (None, None) => bail!("pass --prompt or --prompt-tokens"),
    };
    let device = resolve_device(args.model.device);
    let opts = args
        .engine
        .backend_options(args.model.block_size, 0, &files.config);
    let t0 = Instant::now();
    let backend = build_backend(
        device,
        &files,
        args.model.load_format,
        args.model.seed,
        &opts,
    )?;
    eprintln!(
        "loaded {} on {device:?} in {:.1}s",
        args.model.model,
        t0.elapsed().as_secs_f64()
    );
    let engine = Engine::start(
        backend,
        files.tokenizer.clone(),
        args.engine.engine_config(),
    );
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.sampling_seed,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        ..Default::default()
    };
    let req = GenerateRequest {
        id: "generate".into(),
        prompt_tokens: prompt_tokens.clone(),
        params,
    };
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let mut stream = engine.generate(req).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut first, mut tokens, mut text, mut finish) =
        (None, Vec::<u32>::new(), String::new(), None);
    let mut out = std::io::stdout();
    let result = futures::executor::block_on(async {
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| anyhow::anyhow!("{e}"))?;
            first.get_or_insert_with(|| start.elapsed());
            tokens.extend(&piece.token_ids);
            text.push_str(&piece.text);
            finish = finish.or(piece.finish_reason);
            if files.tokenizer.is_some() && !args.json {
                write!(out, "{}", piece.text)?;
                out.flush()?;
            }
        }
        anyhow::Ok(())
    });
    engine.shutdown();
    result?;
    let total = start.elapsed().as_secs_f64();
    let ttft = first.map(|d| d.as_secs_f64()).unwrap_or(total);
    let decode_rate = if tokens.len() > 1 {
        (tokens.len() - 1) as f64 / (total - ttft).max(1e-9)
    } else {
        0.0
    };
    if args.json {
        let g = Generation {
            prompt_tokens: prompt_tokens.clone(),
            text: files.tokenizer.as_ref().map(|_| text),
            tokens,
            finish_reason: finish,
            timing: Timing {
                load_ms,
                prefill_ms: ttft * 1e3,
                decode_ms: (total - ttft) * 1e3,
                decode_tokens_per_s: decode_rate,
            },
        };
        println!("{}", serde_json::to_string(&g)?);
        return Ok(());
    }
    if files.tokenizer.is_none() {
        print!(
            "{}",
            tokens
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    println!();
    eprintln!(
        "prompt {} tokens, generated {}; time to first token {:.1} ms; {decode_rate:.1} tokens/s after it",
        prompt_tokens.len(),
        tokens.len(),
        ttft * 1e3
    );
    Ok(())
}
