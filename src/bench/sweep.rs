//! The concurrency sweep: at each level C, warm-up requests then measured requests with C in
//! flight at all times, each request timed the same way whatever the target.

use super::artifacts::{self, JSON_FILE};
use super::metrics::{LevelMetrics, RequestRecord};
use super::prompts::{BenchTokenizer, Prompt, PromptGenerator, PromptShape};
use super::target::LoadTarget;
use anyhow::{bail, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// Names the run directories (`/` becomes `_`).
    pub model: String,
    /// `chat` or `completions`, for run directory names.
    pub endpoint_name: String,
    pub shape: PromptShape,
    pub osl: usize,
    pub concurrencies: Vec<usize>,
    /// Per level; `None` means 2·C.
    pub warmup_request_count: Option<usize>,
    /// Per level; `None` means 10·C.
    pub request_count: Option<usize>,
    pub random_seed: u64,
    pub artifact_dir: PathBuf,
    pub overwrite: bool,
    pub progress: bool,
    /// Recorded under `input_config` in every level's JSON.
    pub input_config: serde_json::Value,
}

impl SweepConfig {
    pub fn warmup(&self, c: usize) -> usize {
        self.warmup_request_count.unwrap_or(2 * c)
    }
    pub fn measured(&self, c: usize) -> usize {
        self.request_count.unwrap_or(10 * c)
    }
    pub fn level_dir(&self, c: usize) -> PathBuf {
        artifacts::level_dir(&self.artifact_dir, &self.model, &self.endpoint_name, c)
    }
}

#[derive(Debug, Clone)]
pub struct LevelResult {
    pub concurrency: usize,
    pub metrics: LevelMetrics,
    /// Measured requests that failed (left out of the metrics).
    pub errors: usize,
    /// Read back from existing artifacts instead of run.
    pub resumed: bool,
    pub dir: PathBuf,
}

/// Runs every level in order and writes its artifacts; levels with artifacts are read back
/// unless `overwrite` is set.
pub async fn run_sweep(
    target: Arc<dyn LoadTarget>,
    tokenizer: Option<Arc<BenchTokenizer>>,
    cfg: &SweepConfig,
) -> Result<Vec<LevelResult>> {
    if cfg.concurrencies.is_empty() || cfg.concurrencies.contains(&0) {
        bail!("--concurrency needs positive values, e.g. 1,2,4");
    }
    if cfg.osl == 0 {
        bail!("--osl must be at least 1");
    }
    let todo: Vec<usize> = cfg
        .concurrencies
        .iter()
        .copied()
        .filter(|&c| cfg.overwrite || !cfg.level_dir(c).join(JSON_FILE).exists())
        .collect();
    let mut results = Vec::new();
    for &c in &cfg.concurrencies {
        let dir = cfg.level_dir(c);
        if !todo.contains(&c) {
            let metrics = artifacts::read_level(&dir)?;
            eprintln!(
                "concurrency {c}: artifacts exist in {} (skipped; --overwrite reruns)",
                dir.display()
            );
            results.push(LevelResult {
                concurrency: c,
                metrics,
                errors: 0,
                resumed: true,
                dir,
            });
            continue;
        }
        let (warmup, measured) = (cfg.warmup(c), cfg.measured(c));
        let prompts = {
            let (tok, shape, seed) = (tokenizer.clone(), cfg.shape, level_seed(cfg.random_seed, c));
            tokio::task::spawn_blocking(move || {
                PromptGenerator::new(tok.as_deref(), shape, seed)?.prompts(warmup + measured)
            })
            .await??
        };
        let bar = progress_bar(cfg.progress, c, (warmup + measured) as u64);
        bar.set_message("warm-up");
        let p = &prompts[..warmup];
        let _ = run_phase(&target, tokenizer.clone(), p, cfg.osl, c, &bar).await;
        bar.set_message("measuring");
        let p = &prompts[warmup..warmup + measured];
        let outcomes = run_phase(&target, tokenizer.clone(), p, cfg.osl, c, &bar).await;
        bar.finish_and_clear();
        let mut records = Vec::new();
        let mut first_error = None;
        for o in outcomes {
            match o {
                Ok(r) => records.push(r),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let errors = measured - records.len();
        if records.is_empty() {
            let e = first_error.map(|e| format!("{e:#}")).unwrap_or_default();
            bail!("concurrency {c}: all {measured} requests failed; first error: {e}");
        }
        if let Some(e) = first_error {
            eprintln!(
                "concurrency {c}: {errors} of {measured} requests failed (left out); first: {e:#}"
            );
        }
        let metrics = LevelMetrics::from_records(&records)?;
        let mut input_config = cfg.input_config.clone();
        if let Some(o) = input_config.as_object_mut() {
            o.insert("concurrency".into(), c.into());
            o.insert("request_count".into(), measured.into());
            o.insert("warmup_request_count".into(), warmup.into());
            o.insert("failed_request_count".into(), errors.into());
        }
        artifacts::write_level(&dir, &metrics, input_config)?;
        results.push(LevelResult {
            concurrency: c,
            metrics,
            errors,
            resumed: false,
            dir,
        });
    }
    Ok(results)
}

fn progress_bar(enabled: bool, c: usize, len: u64) -> ProgressBar {
    let target = if enabled {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    let style = ProgressStyle::with_template(&format!(
        "concurrency {c:>4} {{msg:9}} [{{bar:30}}] {{pos}}/{{len}} requests, {{elapsed}}"
    ))
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// The prompt seed of level `c`. Each level sends prompts of its own (genai-perf, run once per
/// level with one seed, sends the same ones at every level): a server with prefix caching on
/// would otherwise find a level's prompts cached by the levels before it and skip their prefills
/// (on 2 H200s a prefill-bound deployment measured 246 tokens/s/gpu at C = 64 so, 183 without).
fn level_seed(seed: u64, c: usize) -> u64 {
    seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Sends `prompts` with `concurrency` requests in flight; outcomes in prompt order.
async fn run_phase(
    target: &Arc<dyn LoadTarget>,
    tokenizer: Option<Arc<BenchTokenizer>>,
    prompts: &[Prompt],
    osl: usize,
    concurrency: usize,
    bar: &ProgressBar,
) -> Vec<Result<RequestRecord>> {
    let prompts: Arc<Vec<Prompt>> = Arc::new(prompts.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let origin = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.min(prompts.len()) {
        let (target, tok, prompts, next, bar) = (
            target.clone(),
            tokenizer.clone(),
            prompts.clone(),
            next.clone(),
            bar.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= prompts.len() {
                    return done;
                }
                let outcome = one_request(&*target, tok.as_deref(), &prompts[i], osl, origin).await;
                bar.inc(1);
                done.push((i, outcome));
            }
        }));
    }
    let mut outcomes: Vec<Option<Result<RequestRecord>>> =
        (0..prompts.len()).map(|_| None).collect();
    for task in tasks {
        match task.await {
            Ok(done) => {
                for (i, o) in done {
                    outcomes[i] = Some(o);
                }
            }
            Err(e) => tracing::error!("a load task panicked: {e}"),
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(anyhow::anyhow!("request lost (its load task panicked)"))))
        .collect()
}

/// Times one request as genai-perf does: TTFT to the first piece with output, latency to the last
/// one (the usage chunk and `[DONE]` after it do not count). OSL: exact token counts when the
/// target gives them, else the tokenizer's count of the whole streamed text (genai-perf's
/// method), else the server's usage, else the number of pieces with output.
pub async fn one_request(
    target: &dyn LoadTarget,
    tokenizer: Option<&BenchTokenizer>,
    prompt: &Prompt,
    osl: usize,
    origin: Instant,
) -> Result<RequestRecord> {
    let start_s = origin.elapsed().as_secs_f64();
    let mut stream = target.stream(prompt, osl).await?;
    let (mut first_token_s, mut last_token_s) = (None, 0.0);
    let (mut text, mut exact, mut usage, mut chunks) = (String::new(), None::<usize>, None, 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if chunk.has_output() {
            last_token_s = origin.elapsed().as_secs_f64();
            first_token_s.get_or_insert(last_token_s);
            chunks += 1;
        }
        text.push_str(&chunk.text);
        if let Some(n) = chunk.tokens {
            *exact.get_or_insert(0) += n;
        }
        usage = chunk.completion_tokens.or(usage);
    }
    let Some(first_token_s) = first_token_s else {
        bail!("the response streamed no output")
    };
    let output_tokens = match (exact, tokenizer) {
        (Some(n), _) => n,
        (None, Some(t)) => t.count(&text)?,
        (None, None) => usage.unwrap_or(chunks),
    };
    Ok(RequestRecord {
        start_s,
        first_token_s,
        end_s: last_token_s,
        input_tokens: prompt.input_tokens,
        output_tokens,
    })
}
