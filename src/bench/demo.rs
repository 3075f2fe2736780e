//! `tandem demo`: an embedded aggregated and an embedded disaggregated deployment of a small
//! model with dummy weights, on the same number of devices, swept in this process; artifacts,
//! `pareto_plot.png` and the gain table. No network, no downloads.

use super::artifacts::DeploymentConfig;
use super::inprocess::{start_aggregated, start_disaggregated, LocalDeployment, WorkerTarget};
use super::prompts::{BenchTokenizer, PromptShape};
use super::{report, run_sweep, LevelResult, SweepConfig};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The model and engine settings; `replicas` is ignored (each side gets two engines: two
    /// aggregated, or one prefill and one decode).
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
    pub disaggregated: Vec<LevelResult>,
    /// The pareto report (per-deployment points and the gain table).
    pub report: String,
}

pub const AGG_DIR: &str = "agg_tp1dp2";
pub const DISAGG_DIR: &str = "disagg_prefill_tp1dp1_decode_tp1dp1";
const AGG_NAME: &str = "aggregated (2 workers)";
const DISAGG_NAME: &str = "disaggregated (1 prefill + 1 decode)";

pub async fn run(cfg: &DemoConfig) -> Result<DemoOutcome> {
    let agg = LocalDeployment {
        replicas: 2,
        ..cfg.deployment.clone()
    };
    let (workers, files) = tokio::task::spawn_blocking(move || start_aggregated(&agg)).await??;
    let tokenizer =
        Arc::new(BenchTokenizer::load(&files.dir).with_context(|| {
            format!("the demo model {} needs a tokenizer", files.dir.display())
        })?);
    let device = format!("{:?}", cfg.deployment.device).to_lowercase();
    eprintln!(
        "aggregated: 2 engines of {} (tp1 dp2, device {device})",
        cfg.deployment.model
    );
    let agg_dir = cfg.output_dir.join(AGG_DIR);
    let agg_config = deployment_config(cfg, "aggregated", AGG_NAME);
    let target = Arc::new(WorkerTarget::new(workers)?);
    let aggregated = sweep(cfg, target, tokenizer.clone(), agg_dir.clone(), agg_config).await?;

    eprintln!(
        "disaggregated: 1 prefill + 1 decode engine of {} (every prefill remote, KV moved in \
         process, device {device})",
        cfg.deployment.model
    );
    let (deployment, _) = start_disaggregated(&cfg.deployment, 1, 1).await?;
    let disagg_dir = cfg.output_dir.join(DISAGG_DIR);
    let disagg_config = deployment_config(cfg, "disaggregated", DISAGG_NAME);
    let target = Arc::new(WorkerTarget::embedded(deployment)?);
    let disaggregated = sweep(cfg, target, tokenizer, disagg_dir.clone(), disagg_config).await?;

    let report = report::analyze(&[agg_dir, disagg_dir], &cfg.output_dir, Some(AGG_NAME))?;
    Ok(DemoOutcome {
        aggregated,
        disaggregated,
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
    target: Arc<WorkerTarget>,
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
    run_sweep(target, Some(tokenizer), &sweep).await
}
