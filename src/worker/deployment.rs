//! The embedded deployment: prefill, decode and aggregated workers in this process, on the
//! in-process runtime (no etcd, no NATS), for `tandem serve` with a disaggregated deployment file
//! and `tandem demo`. Prefill workers write KV straight into the decode workers' engines (or over
//! local TCP, to exercise that path).

use super::decode::{DecodeConfig, DecodeWorker, EngineSink};
use super::prefill::{PrefillConfig, PrefillWorker};
use super::{LocalWorker, WorkerClient};
use crate::engine::EngineHandle;
use crate::kv::transfer::local::{InProcessTransfer, SinkRegistration};
use crate::kv::transfer::tcp::{TcpKvServer, TcpTransfer};
use crate::kv::transfer::{KvSink, KvTransfer};
use crate::runtime::local::LocalRuntime;
use crate::runtime::Runtime;
use anyhow::{ensure, Result};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmbeddedTransport {
    /// Decode engines import the prefill engines' exported blocks directly.
    #[default]
    InProcess,
    /// Through a TCP KV server per decode worker on 127.0.0.1 (as between processes).
    Tcp,
}

/// The engines of an embedded deployment, already started, and how they cooperate.
pub struct EmbeddedSpec {
    pub agg: Vec<EngineHandle>,
    pub prefill: Vec<EngineHandle>,
    pub decode: Vec<EngineHandle>,
    pub decode_config: DecodeConfig,
    pub prefill_config: PrefillConfig,
    pub transport: EmbeddedTransport,
}

/// A running embedded deployment; dropping it stops the prefill workers.
pub struct EmbeddedDeployment {
    /// The workers that take requests (agg and decode), for the router.
    pub workers: Vec<Arc<dyn WorkerClient>>,
    pub runtime: Arc<LocalRuntime>,
    transfer: Arc<dyn KvTransfer>,
    prefill_config: PrefillConfig,
    /// One per prefill worker.
    stops: parking_lot::Mutex<Vec<CancellationToken>>,
    _sinks: Vec<SinkRegistration>,
    _servers: Vec<TcpKvServer>,
}

impl Drop for EmbeddedDeployment {
    fn drop(&mut self) {
        self.stop_prefill_workers();
    }
}

impl EmbeddedDeployment {
    /// Stops the prefill workers (their running jobs stay queued, as when a process dies).
    pub fn stop_prefill_workers(&self) {
        self.stops.lock().drain(..).for_each(|s| s.cancel());
    }

    /// Starts one more prefill worker on `engine`.
    pub fn add_prefill_worker(&self, id: &str, engine: EngineHandle) {
        let worker = Arc::new(PrefillWorker {
            id: id.to_string(),
            engine,
            runtime: self.runtime.clone(),
            transfers: vec![self.transfer.clone()],
            config: self.prefill_config.clone(),
        });
        let stop = CancellationToken::new();
        self.stops.lock().push(stop.clone());
        tokio::spawn(worker.run(stop));
    }
}

pub async fn start_embedded(spec: EmbeddedSpec) -> Result<EmbeddedDeployment> {
    ensure!(
        spec.prefill.is_empty() == spec.decode.is_empty(),
        "a disaggregated deployment needs both prefill and decode workers"
    );
    ensure!(
        !spec.agg.is_empty() || !spec.decode.is_empty(),
        "the deployment has no worker that takes requests"
    );
    let runtime = Arc::new(LocalRuntime::new());
    let registry = InProcessTransfer::new();
    let transfer: Arc<dyn KvTransfer> = match spec.transport {
        EmbeddedTransport::InProcess => Arc::new(registry.clone()),
        EmbeddedTransport::Tcp => Arc::new(TcpTransfer::new()),
    };
    let mut workers: Vec<Arc<dyn WorkerClient>> = Vec::new();
    for (i, engine) in spec.agg.into_iter().enumerate() {
        workers.push(Arc::new(LocalWorker::new(format!("agg-{i}"), engine)));
    }
    let (mut sinks, mut servers) = (Vec::new(), Vec::new());
    for (i, engine) in spec.decode.into_iter().enumerate() {
        let id = format!("decode-{i}");
        let layout = engine.limits().kv_layout;
        let sink = EngineSink::new(engine.clone(), layout, spec.decode_config.kv_ranks)?;
        let endpoint = match spec.transport {
            EmbeddedTransport::InProcess => {
                let (endpoint, registration) = registry.register(&id, sink.clone());
                sinks.push(registration);
                endpoint
            }
            EmbeddedTransport::Tcp => {
                let server = TcpKvServer::start("127.0.0.1:0", "127.0.0.1", sink.clone()).await?;
                let endpoint = server.endpoint();
                servers.push(server);
                endpoint
            }
        };
        let rt: Arc<dyn Runtime> = runtime.clone();
        let worker = DecodeWorker::start(
            &id,
            engine,
            rt,
            spec.decode_config.clone(),
            sink.rank_layout(),
            vec![endpoint],
        )
        .await?;
        workers.push(Arc::new(worker));
    }
    let deployment = EmbeddedDeployment {
        workers,
        runtime,
        transfer,
        prefill_config: spec.prefill_config,
        stops: Default::default(),
        _sinks: sinks,
        _servers: servers,
    };
    for (i, engine) in spec.prefill.into_iter().enumerate() {
        deployment.add_prefill_worker(&format!("prefill-{i}"), engine);
    }
    Ok(deployment)
}
