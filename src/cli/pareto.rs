//! `tandem pareto`: Pareto frontiers, `pareto_plot.png`, `results.csv` and the gain table from
//! benchmark artifact directories (one per deployment, each with deployment_config.json).

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Deployment artifact directories (each holds deployment_config.json and run directories).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Where pareto_plot.png and results.csv go.
    #[arg(long, default_value = ".")]
    pub output_dir: PathBuf,
    /// The deployment the others are compared with (its name; default: the first directory).
    #[arg(long)]
    pub baseline: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let table =
        crate::bench::report::analyze(&args.dirs, &args.output_dir, args.baseline.as_deref())?;
    print!("{table}");
    println!(
        "wrote {} and {}",
        args.output_dir.join("pareto_plot.png").display(),
        args.output_dir.join("results.csv").display()
    );
    Ok(())
}
