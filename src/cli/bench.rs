//! `tandem bench`: the guide's concurrency sweep against an OpenAI endpoint (genai-perf's flag
//! names), optionally starting the vLLM baseline behind Tandem's least-connections balancer.

use crate::bench::client::{base_url, EndpointType, HttpTarget};
use crate::bench::inprocess::{
    start_aggregated, start_disaggregated, LocalDeployment, WorkerTarget,
};
use crate::bench::launcher::{self, VllmFleet, VllmLaunch};
use crate::bench::prompts::{resolve_tokenizer, BenchTokenizer, PromptShape};
use crate::bench::LoadTarget;
use crate::bench::{balancer, report, run_sweep, DeploymentConfig, LevelResult, SweepConfig};
use crate::cli::common::{DeviceKind, EngineArgs, LoadFormat};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Aggregated,
    Disaggregated,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The server: `host:port` or `http://host:port` (ignored with --launch-vllm).
    #[arg(short = 'u', long, default_value = "localhost:8000")]
    pub url: String,
    /// The model name sent in requests (and used in run directory names).
    #[arg(short = 'm', long)]
    pub model: String,
    /// Tokenizer directory or tokenizer.json for exact prompt and output token counts (default:
    /// the model's, when --model is a local directory or preset).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = EndpointType::Chat)]
    pub endpoint_type: EndpointType,
    /// Accepted for genai-perf compatibility; requests always stream.
    #[arg(long)]
    pub streaming: bool,
    /// Input sequence length in tokens.
    #[arg(
        long = "synthetic-input-tokens-mean",
        visible_alias = "isl",
        default_value_t = 3000
    )]
    pub isl: usize,
    #[arg(
        long = "synthetic-input-tokens-stddev",
        visible_alias = "isl-stddev",
        default_value_t = 0.0
    )]
    pub isl_stddev: f64,
    /// Output sequence length in tokens (forced: max_tokens = min_tokens, ignore_eos).
    #[arg(
        long = "output-tokens-mean",
        visible_alias = "osl",
        default_value_t = 150
    )]
    pub osl: usize,
    /// Concurrency levels of the sweep.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,256"
    )]
    pub concurrency: Vec<usize>,
    /// Warm-up requests per level (default 2·C).
    #[arg(long)]
    pub warmup_request_count: Option<usize>,
    /// Measured requests per level (default 10·C).
    #[arg(long)]
    pub request_count: Option<usize>,
    #[arg(long, default_value_t = 100)]
    pub random_seed: u64,
    #[arg(long, default_value = "artifacts")]
    pub artifact_dir: PathBuf,
    /// Rerun levels whose artifacts already exist (otherwise they are skipped).
    #[arg(long)]
    pub overwrite: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600)]
    pub request_timeout_s: u64,
    #[arg(long)]
    pub no_progress: bool,

    /// deployment_config.json: who serves (`tandem`, `vllm`, `dynamo`, ...; default tandem, or
    /// vllm with --launch-vllm).
    #[arg(long)]
    pub deployment_kind: Option<String>,
    /// deployment_config.json: a label for plots (default: the artifact directory's name).
    #[arg(long)]
    pub deployment_name: Option<String>,
    #[arg(long, value_enum, default_value_t = Mode::Aggregated)]
    pub mode: Mode,
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    #[arg(long, default_value_t = 1)]
    pub dp: usize,
    #[arg(long, default_value_t = 0)]
    pub prefill_tp: usize,
    #[arg(long, default_value_t = 0)]
    pub prefill_dp: usize,
    #[arg(long, default_value_t = 0)]
    pub decode_tp: usize,
    #[arg(long, default_value_t = 0)]
    pub decode_dp: usize,

    /// Start `vllm serve` with these arguments (e.g. "MODEL --tensor-parallel-size 4 --block-size 128"),
    /// one instance per --vllm-gpus group, behind Tandem's least-connections balancer.
    #[arg(long, allow_hyphen_values = true)]
    pub launch_vllm: Option<String>,
    /// GPU groups, one per instance: `0-3,4-7` (ranges), `0+2,1+3` (lists). Default: one
    /// instance with CUDA_VISIBLE_DEVICES unset.
    #[arg(long)]
    pub vllm_gpus: Option<String>,
    /// The vLLM program, with leading arguments if any (split on spaces).
    #[arg(long, default_value = "vllm")]
    pub vllm_executable: String,
    #[arg(long, default_value_t = 8001)]
    pub vllm_base_port: u16,
    /// The balancer's port (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub balancer_port: u16,
    #[arg(long, default_value_t = 1800)]
    pub vllm_startup_timeout_s: u64,
    /// Drive engines in this process through `WorkerClient`, without HTTP (--model is a model
    /// directory or preset; --dp engines, or with --mode disaggregated --prefill-dp prefill and
    /// --decode-dp decode engines, every prefill remote; the engine flags below apply).
    #[arg(long)]
    pub in_process: bool,
    /// With --in-process: where the weights come from.
    #[arg(long, value_enum, default_value_t = LoadFormat::Safetensors)]
    pub load_format: LoadFormat,
    /// With --in-process.
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,
    /// With --in-process: tokens per KV block.
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// With --in-process: seed of dummy weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Already-running OpenAI servers to balance over, e.g. a second node's `vllm serve`
    /// (with --launch-vllm: besides the launched instances). Repeatable.
    #[arg(long = "upstream")]
    pub upstreams: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let results = rt.block_on(run_async(args))?;
    println!("{}", report::summary(&results));
    Ok(())
}

/// Runs the whole command; returns the levels for the summary.
pub async fn run_async(args: Args) -> Result<Vec<LevelResult>> {
    if args.isl == 0 || args.osl == 0 {
        bail!("--isl and --osl must be at least 1");
    }
    // Registered first, so Ctrl-C (or SIGTERM) anywhere below stops the instances cleanly.
    let mut interrupt = Interrupt::new()?;
    let mut deployment = deployment_config(&args);
    let (mut fleet, mut lb) = (None, None);
    let external: Vec<String> = args.upstreams.iter().map(|u| base_url(u)).collect();
    let (target, tokenizer, url): (Arc<dyn LoadTarget>, _, _) = if args.in_process {
        let (target, tokenizer) = in_process_target(&args, &mut deployment).await?;
        (target, tokenizer, "in-process".to_string())
    } else {
        let url = match &args.launch_vllm {
            None if external.is_empty() => args.url.clone(),
            None => {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.balancer_port));
                let b = lb.insert(balancer::start(addr, external).await?);
                eprintln!(
                    "least-connections balancer on {} over --upstream servers",
                    b.url()
                );
                b.url()
            }
            Some(serve_args) => {
                let launch = VllmLaunch {
                    executable: args
                        .vllm_executable
                        .split_whitespace()
                        .map(String::from)
                        .collect(),
                    serve_args: serve_args.split_whitespace().map(String::from).collect(),
                    model: args.model.clone(),
                    gpu_groups: match &args.vllm_gpus {
                        Some(spec) => launcher::parse_gpu_groups(spec)?,
                        None => vec![vec![]],
                    },
                    host: "127.0.0.1".into(),
                    base_port: args.vllm_base_port,
                    startup_timeout: Duration::from_secs(args.vllm_startup_timeout_s),
                    log_dir: args.artifact_dir.clone(),
                };
                deployment.tp = launcher::tensor_parallel_size(&launch.serve_args)?;
                deployment.dp = launch.gpu_groups.len() + external.len();
                let started = fleet.insert(VllmFleet::spawn(&launch)?);
                tokio::select! {
                    r = started.wait_healthy(launch.startup_timeout) => r?,
                    _ = interrupt.recv() => bail!("interrupted while waiting for vLLM; stopped it"),
                }
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.balancer_port));
                let all: Vec<String> = started.urls.iter().cloned().chain(external).collect();
                let b = lb.insert(balancer::start(addr, all).await?);
                eprintln!(
                    "{} instance(s) healthy; least-connections balancer on {}",
                    started.urls.len(),
                    b.url()
                );
                b.url()
            }
        };
        let target = Arc::new(HttpTarget::new(
            &url,
            &args.model,
            args.endpoint_type,
            Duration::from_secs(args.request_timeout_s),
        )?);
        (target, http_tokenizer(&args)?, url)
    };
    deployment.write(&args.artifact_dir)?;
    let cfg = SweepConfig {
        model: args.model.clone(),
        endpoint_name: args.endpoint_type.artifact_name().into(),
        shape: PromptShape {
            isl_mean: args.isl,
            isl_stddev: args.isl_stddev,
        },
        osl: args.osl,
        concurrencies: args.concurrency.clone(),
        warmup_request_count: args.warmup_request_count,
        request_count: args.request_count,
        random_seed: args.random_seed,
        artifact_dir: args.artifact_dir.clone(),
        overwrite: args.overwrite,
        progress: !args.no_progress,
        input_config: serde_json::json!({
            "url": url, "model": args.model, "endpoint_type": args.endpoint_type.artifact_name(),
            "streaming": true, "synthetic_input_tokens_mean": args.isl,
            "synthetic_input_tokens_stddev": args.isl_stddev, "output_tokens_mean": args.osl,
            "random_seed": args.random_seed,
            "tokenizer": args.tokenizer.as_ref().map(|p| p.display().to_string()),
        }),
    };
    let results = tokio::select! {
        r = run_sweep(target, tokenizer, &cfg) => r,
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted; finished levels are kept")),
    };
    drop(lb);
    if let Some(mut f) = fleet.take() {
        f.stop();
    }
    results
}

/// The tokenizer for HTTP targets, with a warning when there is none.
fn http_tokenizer(args: &Args) -> Result<Option<Arc<BenchTokenizer>>> {
    let tokenizer = resolve_tokenizer(args.tokenizer.as_deref(), &args.model)?.map(Arc::new);
    if tokenizer.is_none() {
        eprintln!(
            "warning: no tokenizer (pass --tokenizer DIR): prompts use `w<N>` words, exact only for \
             word-level tokenizers; output tokens come from the server's usage or the chunk count"
        );
    }
    Ok(tokenizer)
}

/// Starts `--dp` engines of `--model` in this process; prompts need the model's tokenizer.
async fn in_process_target(
    args: &Args,
    deployment: &mut DeploymentConfig,
) -> Result<(Arc<dyn LoadTarget>, Option<Arc<BenchTokenizer>>)> {
    if args.launch_vllm.is_some() || !args.upstreams.is_empty() {
        bail!("--in-process drives engines in this process; it does not combine with --launch-vllm or --upstream");
    }
    let local = LocalDeployment {
        model: args.model.clone(),
        load_format: args.load_format,
        device: args.device,
        block_size: args.block_size,
        seed: args.seed,
        engine: args.engine.engine_config(),
        num_kv_blocks: args.engine.num_kv_blocks,
        gpu_memory_utilization: args.engine.gpu_memory_utilization,
        replicas: args.dp,
    };
    let (target, files) = if deployment.is_disaggregated() {
        let (p, d) = (deployment.prefill_dp, deployment.decode_dp);
        eprintln!(
            "starting {p} prefill + {d} decode engine(s) of {} in this process",
            local.model
        );
        let (embedded, files) = start_disaggregated(&local, p, d).await?;
        (WorkerTarget::embedded(embedded)?, files)
    } else {
        eprintln!(
            "starting {} engine(s) of {} in this process",
            local.replicas, local.model
        );
        let (workers, files) =
            tokio::task::spawn_blocking(move || start_aggregated(&local)).await??;
        (WorkerTarget::new(workers)?, files)
    };
    let tok_path = args.tokenizer.clone().unwrap_or_else(|| files.dir.clone());
    let tokenizer = BenchTokenizer::load(&tok_path).map_err(|e| {
        anyhow::anyhow!("--in-process needs the model's tokenizer (or --tokenizer DIR): {e:#}")
    })?;
    // One engine per device until tensor parallelism lands.
    (deployment.tp, deployment.prefill_tp, deployment.decode_tp) = (1, 1, 1);
    Ok((Arc::new(target), Some(Arc::new(tokenizer))))
}

/// SIGINT or SIGTERM.
struct Interrupt {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

fn deployment_config(args: &Args) -> DeploymentConfig {
    let or = |v: usize, d: usize| if v == 0 { d } else { v };
    DeploymentConfig {
        kind: args.deployment_kind.clone().unwrap_or_else(|| {
            if args.launch_vllm.is_some() {
                "vllm"
            } else {
                "tandem"
            }
            .to_string()
        }),
        mode: match args.mode {
            Mode::Aggregated => "aggregated",
            Mode::Disaggregated => "disaggregated",
        }
        .into(),
        tp: args.tp,
        dp: args.dp,
        prefill_tp: or(args.prefill_tp, 1),
        prefill_dp: or(args.prefill_dp, 1),
        decode_tp: or(args.decode_tp, 1),
        decode_dp: or(args.decode_dp, 1),
        model: args.model.clone(),
        isl: args.isl,
        osl: args.osl,
        name: args.deployment_name.clone(),
    }
}
