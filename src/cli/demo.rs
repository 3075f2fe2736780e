//! `tandem demo`: aggregated vs disaggregated serving of a small dummy model, end to end, in this
//! process: sweeps, artifacts, `pareto_plot.png` and the comparison table.

use crate::bench::demo::{self, DemoConfig};
use crate::bench::inprocess::LocalDeployment;
use crate::bench::report;
use crate::cli::common::{DeviceKind, LoadFormat};
use crate::engine::EngineConfig;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A small model preset or directory (dummy weights are generated from its config).
    #[arg(long, default_value = "tiny-llama")]
    pub model: String,
    /// `auto` picks a GPU when one is usable, else the CPU.
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub concurrency: Vec<usize>,
    #[arg(long, default_value_t = 512)]
    pub isl: usize,
    #[arg(long, default_value_t = 64)]
    pub osl: usize,
    /// Measured requests per level (default 10·C).
    #[arg(long)]
    pub request_count: Option<usize>,
    #[arg(long, default_value = "tandem-demo")]
    pub output_dir: PathBuf,
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = DemoConfig {
        deployment: LocalDeployment {
            model: args.model,
            load_format: LoadFormat::Dummy,
            device: args.device,
            block_size: 16,
            seed: 0,
            engine: EngineConfig {
                max_num_batched_tokens: 2048,
                enable_prefix_caching: false,
                ..EngineConfig::default()
            },
            num_kv_blocks: Some(1024),
            gpu_memory_utilization: 0.9,
            replicas: 2,
        },
        concurrencies: args.concurrency,
        isl: args.isl,
        osl: args.osl,
        request_count: args.request_count,
        output_dir: args.output_dir.clone(),
        progress: !args.no_progress,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = rt.block_on(demo::run(&cfg))?;
    println!(
        "aggregated (2 engines):\n{}",
        report::summary(&outcome.aggregated)
    );
    println!(
        "disaggregated (1 prefill + 1 decode):\n{}",
        report::summary(&outcome.disaggregated)
    );
    print!("{}", outcome.report);
    println!(
        "artifacts in {}; plot {}",
        args.output_dir.display(),
        args.output_dir.join("pareto_plot.png").display()
    );
    Ok(())
}
