//! `tandem demo`: an embedded aggregated and an embedded disaggregated deployment of a small
//! model with dummy weights, on the same number of devices, swept in this process; artifacts,
//! `pareto_plot.png` and the gain table. No network, no downloads.

use super::artifacts::DeploymentConfig;
use super::inprocess::{start_engines, LocalDeployment, WorkerTarget};
use super::prompts::{BenchTokenizer, PromptShape};
use super::{report, run_sweep, LevelResult, SweepConfig};
use crate::worker::local::LocalWorker;
use crate::worker::WorkerClient;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The deployment shape and engine settings; `replicas` is ignored (each side gets two
    /// engines: two aggregated, or one prefill and one decode).
    pub deployment: LocalDeployment,
    pub concurrencies: Vec<usize>,
    pub isl: usize,
    pub osl: usize,
    /// Measured requests per level (`None`: 10·C).
    pub request_count: Option<usize>,
    pub output_dir: PathBuf,
    pub progress: bool,
}

/// What the demo produced.
pub struct DemoOutcome {
    pub aggregated: Vec<LevelResult>,
    /// `None` until the embedded disaggregated deployment exists.
    pub disaggregated: Option<Vec<LevelResult>>,
    /// The pareto report (per-deployment points and the gain table).
    pub report: String,
}

pub const AGG_DIR: &str = "agg_tp1dp2";
pub const DISAGG_DIR: &str = "disagg_prefill_tp1dp1_decode_tp1dp1";

pub async fn run(cfg: &DemoConfig) -> Result<DemoOutcome> {
    let d = cfg.deployment.clone();
    let (engines, files) = tokio::task::spawn_blocking(move || start_engines(&d, 2)).await??;
    let tokenizer =
        Arc::new(BenchTokenizer::load(&files.dir).with_context(|| {
            format!("the demo model {} needs a tokenizer", files.dir.display())
        })?);
    let workers: Vec<Arc<dyn WorkerClient>> = engines
        .into_iter()
        .enumerate()
        .map(|(i, e)| Arc::new(LocalWorker::new(format!("agg-{i}"), e)) as Arc<dyn WorkerClient>)
        .collect();
    eprintln!(
        "aggregated: 2 engines of {} (tp1 dp2)",
        cfg.deployment.model
    );
    let agg_dir = cfg.output_dir.join(AGG_DIR);
    let agg_deployment = deployment_config(cfg, "aggregated", "tandem aggregated (tp1 dp2)");
    let aggregated = sweep(
        cfg,
        workers,
        tokenizer.clone(),
        agg_dir.clone(),
        agg_deployment,
    )
    .await?;

    eprintln!(
        "disaggregated: NOT RUN — the embedded disaggregated deployment is not in this build yet; \
         the comparison below shows the aggregated deployment only"
    );
    let dirs = vec![agg_dir];
    let report = report::analyze(&dirs, &cfg.output_dir, None)?;
    Ok(DemoOutcome {
        aggregated,
        disaggregated: None,
        report,
    })
}

fn deployment_config(cfg: &DemoConfig, mode: &str, name: &str) -> DeploymentConfig {
    let disagg = mode == "disaggregated";
    DeploymentConfig {
        kind: "tandem".into(),
        mode: mode.into(),
        tp: 1,
        dp: if disagg { 1 } else { 2 },
        prefill_tp: 1,
        prefill_dp: 1,
        decode_tp: 1,
        decode_dp: 1,
        model: cfg.deployment.model.clone(),
        isl: cfg.isl,
        osl: cfg.osl,
        name: Some(name.into()),
    }
}

async fn sweep(
    cfg: &DemoConfig,
    workers: Vec<Arc<dyn WorkerClient>>,
    tokenizer: Arc<BenchTokenizer>,
    dir: PathBuf,
    deployment: DeploymentConfig,
) -> Result<Vec<LevelResult>> {
    deployment.write(&dir)?;
    let sweep = SweepConfig {
        model: cfg.deployment.model.clone(),
        endpoint_name: "chat".into(),
        shape: PromptShape {
            isl_mean: cfg.isl,
            isl_stddev: 0.0,
        },
        osl: cfg.osl,
        concurrencies: cfg.concurrencies.clone(),
        warmup_request_count: None,
        request_count: cfg.request_count,
        random_seed: 100,
        artifact_dir: dir,
        overwrite: true,
        progress: cfg.progress,
        input_config: serde_json::json!({"model": cfg.deployment.model, "in_process": true,
            "mode": deployment.mode, "isl": cfg.isl, "osl": cfg.osl}),
    };
    run_sweep(
        Arc::new(WorkerTarget::new(workers)?),
        Some(tokenizer),
        &sweep,
    )
    .await
}
