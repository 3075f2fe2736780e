//! `tandem serve`: the embedded deployment. One process runs the OpenAI frontend, the router and
//! N aggregated workers (one engine each, on CPU or GPU), described by flags or by a deployment
//! file (`-f benchmarks/agg.yaml`).

use crate::backend::factory::build_backend;
use crate::backend::KvCacheDtype;
use crate::cli::common::{DeviceKind, EngineArgs, LoadFormat, ModelArgs};
use crate::engine::{Engine, EngineHandle};
use crate::frontend::deployment::{Deployment, Role};
use crate::frontend::router::{Router, RouterConfig, RouterMode};
use crate::frontend::tokenizer::PromptTokenizer;
use crate::frontend::{AppState, FrontendConfig};
use crate::model::ModelFiles;
use crate::worker::deployment::{start_embedded, EmbeddedSpec, EmbeddedTransport};
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
// `--model` may come from the deployment file instead.
#[command(mut_arg("model", |a| a.required(false).default_value("")))]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The model name clients send (default: --model).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Address to listen on; 127.0.0.1 keeps the server local.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed once ready).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Workers (engines, each with its own KV pool) in this process.
    #[arg(long, visible_alias = "num-workers", default_value_t = 1)]
    pub data_parallel_size: usize,
    /// How the router picks a worker for each request.
    #[arg(long, value_enum, default_value_t = RouterMode::RoundRobin)]
    pub router_mode: RouterMode,
    /// Require `Authorization: Bearer <key>` on /v1 routes.
    #[arg(long, env = "TANDEM_API_KEY")]
    pub api_key: Option<String>,
    /// Seconds a request may take from arrival to its last token.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_request_bytes: usize,
    /// A deployment file (model and worker groups); its values override the flags.
    #[arg(short = 'f', long = "deployment-file")]
    pub deployment_file: Option<PathBuf>,
}

/// One worker to build.
#[derive(Debug, Clone)]
struct WorkerPlan {
    role: Role,
    device: DeviceKind,
    block_size: usize,
    engine: EngineArgs,
    /// CUDA device ordinal (ignored on the CPU).
    gpu: usize,
}

/// What the flags and the deployment file resolve to.
#[derive(Debug)]
struct Plan {
    model: String,
    served_model_name: Option<String>,
    load_format: LoadFormat,
    router_mode: RouterMode,
    workers: Vec<WorkerPlan>,
    /// How decode workers decide between local and remote prefill (disaggregated files).
    decode: crate::worker::decode::DecodeConfig,
}

fn plan(args: &Args) -> Result<Plan> {
    let base = WorkerPlan {
        role: Role::Agg,
        device: args.model.device,
        block_size: args.model.block_size,
        engine: args.engine.clone(),
        gpu: 0,
    };
    let tp = args.engine.tensor_parallel_size.max(1);
    let mut plan = Plan {
        model: args.model.model.clone(),
        served_model_name: args.served_model_name.clone(),
        load_format: args.model.load_format,
        router_mode: args.router_mode,
        // Worker i on GPUs i·tp ..
        workers: (0..args.data_parallel_size.max(1))
            .map(|i| WorkerPlan {
                gpu: i * tp,
                ..base.clone()
            })
            .collect(),
        decode: Default::default(),
    };
    if let Some(path) = &args.deployment_file {
        let d = Deployment::load(path)?;
        if d.has_role(Role::Prefill) != d.has_role(Role::Decode) {
            bail!(
                "{}: a disaggregated deployment needs both prefill and decode workers",
                path.display()
            );
        }
        plan.model = d.model.clone().unwrap_or(plan.model);
        plan.served_model_name = d.served_model_name.clone().or(plan.served_model_name);
        if let Some(f) = &d.load_format {
            plan.load_format =
                LoadFormat::from_str(f, true).map_err(|e| anyhow::anyhow!("load_format: {e}"))?;
        }
        plan.router_mode = d.router_mode.unwrap_or(plan.router_mode);
        plan.workers.clear();
        let mut next_gpu = 0;
        for g in &d.workers {
            let mut w = base.clone();
            let tp = g.tensor_parallel_size.unwrap_or(tp).max(1);
            w.engine.tensor_parallel_size = tp;
            w.role = g.role;
            if g.role == Role::Decode {
                let c = &mut plan.decode;
                c.max_local_prefill_length = g
                    .max_local_prefill_length
                    .unwrap_or(c.max_local_prefill_length);
                c.max_prefill_queue_size =
                    g.max_prefill_queue_size.unwrap_or(c.max_prefill_queue_size);
                c.conditional_disagg = g.conditional_disagg.unwrap_or(c.conditional_disagg);
            }
            if let Some(dev) = &g.device {
                w.device =
                    DeviceKind::from_str(dev, true).map_err(|e| anyhow::anyhow!("device: {e}"))?;
            }
            w.block_size = g.block_size.unwrap_or(w.block_size);
            let e = &mut w.engine;
            e.max_model_len = g.max_model_len.or(d.max_model_len).or(e.max_model_len);
            e.max_num_seqs = g.max_num_seqs.unwrap_or(e.max_num_seqs);
            e.max_num_batched_tokens = g.max_num_batched_tokens.unwrap_or(e.max_num_batched_tokens);
            e.gpu_memory_utilization = g
                .gpu_memory_utilization
                .map(f64::from)
                .unwrap_or(e.gpu_memory_utilization);
            e.enable_prefix_caching = g.enable_prefix_caching.unwrap_or(e.enable_prefix_caching);
            if let Some(dtype) = &g.kv_cache_dtype {
                e.kv_cache_dtype = KvCacheDtype::from_str(dtype, true)
                    .map_err(|e| anyhow::anyhow!("kv_cache_dtype: {e}"))?;
            }
            // Replicas take `tp` consecutive GPUs each from `first_gpu` (default: after the last
            // group's).
            let first = g.first_gpu.unwrap_or(next_gpu);
            next_gpu = first + g.replicas * tp;
            plan.workers.extend((0..g.replicas).map(|r| WorkerPlan {
                gpu: first + r * tp,
                ..w.clone()
            }));
        }
    }
    if plan.model.is_empty() {
        bail!("no model: pass --model, or set `model:` in the deployment file");
    }
    // Prefill workers hand their KV blocks to decode workers as they are.
    let kv_dtypes: std::collections::BTreeSet<String> = plan
        .workers
        .iter()
        .filter(|w| w.role != Role::Agg)
        .map(|w| format!("{:?}", w.engine.kv_cache_dtype).to_lowercase())
        .collect();
    if kv_dtypes.len() > 1 {
        bail!("prefill and decode workers must share one kv_cache_dtype (got {kv_dtypes:?})");
    }
    Ok(plan)
}

/// Builds every worker's backend and engine.
fn start_engines(plan: &Plan, files: &ModelFiles, seed: u64) -> Result<Vec<EngineHandle>> {
    let mut engines = Vec::with_capacity(plan.workers.len());
    for (i, w) in plan.workers.iter().enumerate() {
        let opts = w.engine.backend_options(w.block_size, w.gpu, &files.config);
        let backend =
            build_backend(w.device, files, plan.load_format, seed, &opts).with_context(|| {
                format!(
                    "worker {i}: building the {:?} backend (GPU {})",
                    w.device, w.gpu
                )
            })?;
        engines.push(Engine::start(
            backend,
            files.tokenizer.clone(),
            w.engine.engine_config(),
        ));
    }
    Ok(engines)
}

pub fn run(args: Args) -> Result<()> {
    let plan = plan(&args)?;
    let files = ModelFiles::resolve(&plan.model)?;
    let engines = start_engines(&plan, &files, args.model.seed)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve(&args, &plan, &files, &engines));
    for e in &engines {
        e.shutdown();
    }
    result
}

async fn serve(
    args: &Args,
    plan: &Plan,
    files: &ModelFiles,
    engines: &[EngineHandle],
) -> Result<()> {
    // Prefill and decode workers cooperate through the in-process runtime (no etcd, no NATS);
    // the router sees the decode (and any aggregated) workers.
    let mut spec = EmbeddedSpec {
        agg: vec![],
        prefill: vec![],
        decode: vec![],
        decode_config: plan.decode.clone(),
        prefill_config: Default::default(),
        transport: EmbeddedTransport::InProcess,
    };
    for (w, e) in plan.workers.iter().zip(engines) {
        match w.role {
            Role::Agg => spec.agg.push(e.clone()),
            Role::Prefill => spec.prefill.push(e.clone()),
            Role::Decode => spec.decode.push(e.clone()),
        }
    }
    let num_prefill = spec.prefill.len();
    let deployment = start_embedded(spec).await?;
    let workers = deployment.workers.clone();
    let num_routed = workers.len();
    // Every worker must accept what the frontend lets through.
    let max_model_len = engines
        .iter()
        .map(|e| e.limits().max_model_len)
        .min()
        .unwrap_or(1);
    let block_size = plan.workers[0].block_size;
    let router = Arc::new(Router::new(
        workers,
        RouterConfig::new(plan.router_mode, block_size),
    ));
    let served_name = plan
        .served_model_name
        .clone()
        .unwrap_or_else(|| plan.model.clone());
    let mut config = FrontendConfig::new(&served_name, max_model_len);
    config.api_key = args.api_key.clone().filter(|k| !k.is_empty());
    config.request_timeout = Duration::from_secs_f64(args.request_timeout.max(0.001));
    config.max_body_bytes = args.max_request_bytes;
    let tokenizer = files
        .tokenizer
        .clone()
        .map(|t| Arc::new(t) as Arc<dyn PromptTokenizer>);
    if tokenizer.is_none() {
        tracing::warn!(
            "{} has no tokenizer: chat is off and completions need token ids",
            files.dir.display()
        );
    }
    let state = AppState::new(config, router, tokenizer);
    let (listener, addr) = crate::frontend::bind(&format!("{}:{}", args.host, args.port)).await?;
    println!(
        "tandem serve: {num_routed} worker(s){} of `{served_name}` (router {:?}, max_model_len {max_model_len}); listening on http://{addr}",
        if num_prefill > 0 { format!(" + {num_prefill} prefill worker(s)") } else { String::new() },
        plan.router_mode,
    );
    std::io::stdout().flush()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(crate::frontend::serve(listener, state, async {
        let _ = stop_rx.await;
    }));
    tokio::select! {
        finished = &mut server => return Ok(finished??),
        _ = stop_signal() => {}
    }
    // Stop accepting; give open requests a moment, then drop them (which cancels them).
    let _ = stop_tx.send(());
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
        .await
        .is_err()
    {
        tracing::warn!("requests still open after {SHUTDOWN_GRACE:?}; closing them");
    }
    Ok(())
}

const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("serve").chain(argv.iter().copied()))?;
        plan(&cli.args)
    }

    #[test]
    fn flags_make_identical_workers() {
        let p = parse(&[
            "--model",
            "m",
            "--data-parallel-size",
            "3",
            "--block-size",
            "16",
            "--max-num-seqs",
            "8",
        ])
        .unwrap();
        assert_eq!(p.workers.len(), 3);
        assert!(p
            .workers
            .iter()
            .all(|w| w.block_size == 16 && w.engine.max_num_seqs == 8));
        assert_eq!(
            parse(&["--model", "m", "--num-workers", "2"])
                .unwrap()
                .workers
                .len(),
            2
        );
    }

    #[test]
    fn deployment_file_overrides_flags() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benchmarks/agg.yaml");
        let p = parse(&["-f", path, "--block-size", "64", "--max-num-seqs", "4"]).unwrap();
        assert_eq!(p.model, "tiny-llama");
        assert_eq!(p.load_format, LoadFormat::Dummy);
        assert_eq!(p.workers.len(), 2);
        assert_eq!(p.workers[0].block_size, 16, "the file wins");
        assert_eq!(p.workers[0].engine.max_num_seqs, 64);
        assert_eq!(p.workers[0].engine.max_model_len, Some(512));
        assert_eq!(p.workers.iter().map(|w| w.gpu).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(p.workers[0].engine.kv_cache_dtype, KvCacheDtype::Auto);
    }

    #[test]
    fn deployment_file_sets_the_kv_cache_dtype() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benchmarks/h200x2/disagg-p1-d1-kv8.yaml"
        );
        let p = parse(&["-f", path]).unwrap();
        assert_eq!(p.workers.len(), 2);
        assert!(p
            .workers
            .iter()
            .all(|w| w.engine.kv_cache_dtype == KvCacheDtype::Fp8));
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "model: m\nworkers: [{kv_cache_dtype: fp7}]").unwrap();
        let err = format!("{:#}", parse(&["-f", bad.to_str().unwrap()]).unwrap_err());
        assert!(err.contains("kv_cache_dtype"), "{err}");
        std::fs::write(
            &bad,
            "model: m\nworkers: [{role: prefill, kv_cache_dtype: fp8}, {role: decode}]",
        )
        .unwrap();
        let err = format!("{:#}", parse(&["-f", bad.to_str().unwrap()]).unwrap_err());
        assert!(err.contains("share one kv_cache_dtype"), "{err}");
    }

    #[test]
    fn the_guides_deployment_files_turn_prefix_caching_off() {
        // Sweep levels would otherwise find prompts cached by earlier runs against the same server.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benchmarks");
        let mut checked = 0;
        for dir in ["h200x2", "h200x4"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let p = parse(&["-f", path.to_str().unwrap()]).unwrap();
                assert!(
                    p.workers.iter().all(|w| !w.engine.enable_prefix_caching),
                    "{}",
                    path.display()
                );
                checked += 1;
            }
        }
        assert!(checked >= 6, "{checked} files");
        // Unset, the command line's value (on by default) holds.
        let agg = concat!(env!("CARGO_MANIFEST_DIR"), "/benchmarks/agg.yaml");
        assert!(
            parse(&["-f", agg]).unwrap().workers[0]
                .engine
                .enable_prefix_caching
        );
        let off = parse(&["-f", agg, "--enable-prefix-caching=false"]).unwrap();
        assert!(!off.workers[0].engine.enable_prefix_caching);
    }

    #[test]
    fn tensor_parallel_replicas_take_consecutive_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tp.yaml");
        std::fs::write(
            &path,
            "model: m\nworkers:\n  - role: agg\n    replicas: 2\n    tp: 2\n  - role: agg\n    tensor_parallel_size: 4\n",
        )
        .unwrap();
        let p = parse(&["-f", path.to_str().unwrap()]).unwrap();
        let gpus: Vec<_> = p.workers.iter().map(|w| w.gpu).collect();
        assert_eq!(gpus, [0, 2, 4]);
        let tps: Vec<_> = p
            .workers
            .iter()
            .map(|w| w.engine.tensor_parallel_size)
            .collect();
        assert_eq!(tps, [2, 2, 4]);
        // The 4-GPU comparison files: two TP2 replicas; two TP1 prefills and a TP2 decode.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/benchmarks/h200x4");
        for (file, want) in [
            ("agg-tp2x2.yaml", vec![(0, 2), (2, 2)]),
            ("disagg-p2-d1tp2.yaml", vec![(0, 1), (1, 1), (2, 2)]),
        ] {
            let p = parse(&["-f", &format!("{dir}/{file}")]).unwrap();
            let got: Vec<_> = p
                .workers
                .iter()
                .map(|w| (w.gpu, w.engine.tensor_parallel_size))
                .collect();
            assert_eq!(got, want, "{file}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        assert!(parse(&["--block-size", "16"])
            .unwrap_err()
            .to_string()
            .contains("no model"));
        let tp2 = parse(&[
            "--model",
            "m",
            "--tensor-parallel-size",
            "2",
            "--num-workers",
            "2",
        ]);
        let gpus: Vec<_> = tp2.unwrap().workers.iter().map(|w| w.gpu).collect();
        assert_eq!(gpus, [0, 2], "worker i of TP2 starts at GPU 2i");
        let disagg = concat!(env!("CARGO_MANIFEST_DIR"), "/benchmarks/disagg.yaml");
        let p = parse(&["-f", disagg]).unwrap();
        assert!(p.workers.iter().any(|w| w.role == Role::Prefill));
        assert!(p.workers.iter().any(|w| w.role == Role::Decode));
    }
}
