//! `tandem worker`: one worker of a distributed deployment (etcd + NATS), in role agg, prefill or
//! decode. Runs until SIGINT or SIGTERM.

use super::common::{EngineArgs, ModelArgs};
use crate::backend::factory::build_backend;
use crate::engine::{Engine, EngineHandle};
use crate::kv::transfer::tcp::{TcpKvServer, TcpTransfer};
use crate::kv::transfer::KvSink;
use crate::model::ModelFiles;
use crate::runtime::distributed::{DistributedConfig, DistributedRuntime};
use crate::runtime::Runtime;
use crate::worker::decode::{DecodeConfig, DecodeWorker, EngineSink};
use crate::worker::prefill::{PrefillConfig, PrefillWorker};
use crate::worker::protocol::{WorkerInfo, WorkerRole};
use crate::worker::service::{publish_metrics, serve_worker};
use crate::worker::{LocalWorker, WorkerClient};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub etcd: String,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// Separates deployments that share the etcd and NATS servers.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Seconds a dead worker stays registered (its etcd lease).
    #[arg(long, default_value_t = 3)]
    pub lease_ttl: u64,
}

impl RuntimeArgs {
    pub fn config(&self, ack_wait: Duration) -> DistributedConfig {
        DistributedConfig {
            namespace: self.namespace.clone(),
            lease_ttl: Duration::from_secs(self.lease_ttl.max(1)),
            ack_wait,
            ..DistributedConfig::new(&self.etcd, &self.nats)
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, value_enum)]
    pub role: WorkerRole,
    /// Unique name of this worker (default: role plus a random suffix).
    #[arg(long)]
    pub worker_id: Option<String>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Decode: prompts with at most this many uncached tokens are prefilled locally.
    #[arg(long, default_value_t = 512)]
    pub max_local_prefill_length: usize,
    /// Decode: with this many prompts or more queued for prefill, prefill locally.
    #[arg(long, default_value_t = 16)]
    pub max_prefill_queue_size: usize,
    /// Decode: send every prompt to a prefill worker.
    #[arg(long)]
    pub no_conditional_disagg: bool,
    /// Decode: address the KV transfer server listens on.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub kv_listen: String,
    /// Decode: host name prefill workers reach this machine by.
    #[arg(long, default_value = "127.0.0.1")]
    pub kv_advertise_host: String,
    /// Decode: receive KV cut into this many head shards, as a decode worker of this
    /// tensor-parallel size does (tests TP-mismatched transfers on a TP1 engine).
    #[arg(long, default_value_t = 1)]
    pub kv_ranks: usize,
    /// Prefill: seconds a taken job may stay unacknowledged before it is delivered again.
    #[arg(long, default_value_t = 10.0)]
    pub prefill_ack_wait: f64,
}

pub fn run(args: Args) -> Result<()> {
    let (engine, files) = build_engine(&args.model, &args.engine)?;
    tokio::runtime::Runtime::new()?.block_on(serve(args, engine, files))
}

/// Loads the model and starts an engine on the device `model.device` names.
pub fn build_engine(model: &ModelArgs, engine: &EngineArgs) -> Result<(EngineHandle, ModelFiles)> {
    let files = ModelFiles::resolve(&model.model)?;
    let opts = engine.backend_options(model.block_size, 0, &files.config);
    let backend = build_backend(model.device, &files, model.load_format, model.seed, &opts)?;
    let handle = Engine::start(backend, files.tokenizer.clone(), engine.engine_config());
    Ok((handle, files))
}

async fn serve(args: Args, engine: EngineHandle, files: ModelFiles) -> Result<()> {
    let role_name = format!("{:?}", args.role).to_lowercase();
    let id = args.worker_id.clone().unwrap_or_else(|| {
        format!(
            "{role_name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    });
    let ack_wait = Duration::from_secs_f64(args.prefill_ack_wait.max(0.5));
    let runtime: Arc<dyn Runtime> = Arc::new(
        DistributedRuntime::connect(&args.runtime.config(ack_wait))
            .await
            .context("connecting to the runtime servers (--etcd, --nats)")?,
    );
    let info = WorkerInfo {
        role: args.role,
        model: args.model.model.clone(),
        block_size: args.model.block_size,
    };
    let stop = CancellationToken::new();
    // Kept alive until shutdown.
    let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    match args.role {
        WorkerRole::Agg => {
            let worker: Arc<dyn WorkerClient> =
                Arc::new(LocalWorker::new(id.clone(), engine.clone()));
            keep.push(Box::new(
                serve_worker(runtime.clone(), worker, &info).await?,
            ));
        }
        WorkerRole::Decode => {
            let sink = EngineSink::new(engine.clone(), engine.limits().kv_layout, args.kv_ranks)?;
            let server =
                TcpKvServer::start(&args.kv_listen, &args.kv_advertise_host, sink.clone()).await?;
            let config = DecodeConfig {
                max_local_prefill_length: args.max_local_prefill_length,
                max_prefill_queue_size: args.max_prefill_queue_size,
                conditional_disagg: !args.no_conditional_disagg,
                kv_ranks: args.kv_ranks,
            };
            let worker = DecodeWorker::start(
                &id,
                engine.clone(),
                runtime.clone(),
                config,
                sink.rank_layout(),
                vec![server.endpoint()],
            )
            .await?;
            tracing::info!("KV transfer server at {:?}", server.endpoint());
            keep.push(Box::new(server));
            keep.push(Box::new(
                serve_worker(runtime.clone(), Arc::new(worker), &info).await?,
            ));
        }
        WorkerRole::Prefill => {
            let worker = Arc::new(PrefillWorker {
                id: id.clone(),
                engine: engine.clone(),
                runtime: runtime.clone(),
                transfers: vec![Arc::new(TcpTransfer::new())],
                config: PrefillConfig {
                    max_batched_tokens: args.engine.max_num_batched_tokens,
                    ..Default::default()
                },
            });
            keep.push(Box::new(
                runtime.register(&id, serde_json::to_vec(&info)?).await?,
            ));
            let e = engine.clone();
            keep.push(Box::new(AbortOnDrop(publish_metrics(
                runtime.clone(),
                &id,
                move || e.metrics(),
            ))));
            tokio::spawn(worker.run(stop.clone()));
        }
    }
    tracing::info!(worker = id, role = role_name, model = %files.dir.display(), "worker ready");
    eprintln!("tandem worker {id} ({role_name}) ready");
    shutdown_signal().await;
    tracing::info!(worker = id, "shutting down");
    stop.cancel();
    drop(keep);
    // Lets the deregistration reach etcd before the process exits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    engine.shutdown();
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
