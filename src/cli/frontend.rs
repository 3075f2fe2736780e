//! `tandem frontend`: the OpenAI API of a distributed deployment. Workers (`tandem worker`) are
//! found through etcd and reached over NATS; the router follows them as they come and go.

use super::worker::{shutdown_signal, RuntimeArgs};
use crate::frontend::router::{Router, RouterConfig, RouterMode};
use crate::frontend::tokenizer::PromptTokenizer;
use crate::frontend::{AppState, FrontendConfig};
use crate::model::ModelFiles;
use crate::runtime::distributed::DistributedRuntime;
use crate::runtime::Runtime;
use crate::worker::remote::WorkerDirectory;
use crate::worker::WorkerClient;
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// The model the workers serve (for its tokenizer, chat template and context length).
    #[arg(long)]
    pub model: String,
    /// The model name clients send (default: --model).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Longest prompt + generation accepted (default: the model's context length).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed once ready).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on /v1 routes.
    #[arg(long, env = "TANDEM_API_KEY")]
    pub api_key: Option<String>,
    /// Seconds a request may take from arrival to its last token.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// How the router picks a worker for each request.
    #[arg(long, value_enum, default_value_t = RouterMode::RoundRobin)]
    pub router_mode: RouterMode,
    /// The workers' `--block-size` (for the KV-aware router's prefix hashing).
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// Seconds to wait at start for the first worker to register (requests before that get 503).
    #[arg(long, default_value_t = 0.0)]
    pub wait_for_workers: f64,
}

pub fn run(args: Args) -> Result<()> {
    let files = ModelFiles::resolve(&args.model)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args, files))
}

async fn serve(args: Args, files: ModelFiles) -> Result<()> {
    let runtime: Arc<dyn Runtime> = Arc::new(
        DistributedRuntime::connect(&args.runtime.config(Duration::from_secs(10)))
            .await
            .context("connecting to the runtime servers (--etcd, --nats)")?,
    );
    let directory = WorkerDirectory::watch(runtime).await?;
    if args.wait_for_workers > 0.0 {
        directory
            .wait_for(1, Duration::from_secs_f64(args.wait_for_workers))
            .await?;
    }
    let router_config = RouterConfig::new(args.router_mode, args.block_size);
    let router = Arc::new(Router::new(vec![], router_config));
    follow_directory(directory, router.clone());
    let max_model_len = args
        .max_model_len
        .unwrap_or(files.config.max_position_embeddings);
    let served_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| args.model.clone());
    let mut config = FrontendConfig::new(&served_name, max_model_len);
    config.api_key = args.api_key.clone().filter(|k| !k.is_empty());
    config.request_timeout = Duration::from_secs_f64(args.request_timeout.max(0.001));
    let tokenizer = files
        .tokenizer
        .clone()
        .map(|t| Arc::new(t) as Arc<dyn PromptTokenizer>);
    let state = AppState::new(config, router, tokenizer);
    let (listener, addr) = crate::frontend::bind(&format!("{}:{}", args.host, args.port)).await?;
    println!(
        "tandem frontend: `{served_name}` on etcd {} + NATS {}; listening on http://{addr}",
        args.runtime.etcd, args.runtime.nats
    );
    std::io::stdout().flush()?;
    crate::frontend::serve(listener, state, shutdown_signal()).await?;
    Ok(())
}

/// Keeps the router's workers equal to the directory's: workers that register are added, workers
/// whose lease expires are removed.
fn follow_directory(directory: WorkerDirectory, router: Arc<Router>) {
    let mut changes = directory.subscribe();
    tokio::spawn(async move {
        let _directory = directory; // lives as long as this task
        let mut known: HashSet<String> = HashSet::new();
        loop {
            let now: Vec<Arc<dyn WorkerClient>> = changes.borrow_and_update().clone();
            let ids: HashSet<String> = now.iter().map(|w| w.id().to_string()).collect();
            for gone in known.difference(&ids) {
                router.remove_worker(gone);
            }
            for w in now.into_iter().filter(|w| !known.contains(w.id())) {
                router.add_worker(w);
            }
            known = ids;
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
}
