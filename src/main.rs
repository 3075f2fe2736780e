use clap::{Parser, Subcommand};
use tandem::cli;

/// Tandem: disaggregated prefill/decode LLM serving, with its own benchmark harness.
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate tokens for one prompt, in this process.
    Generate(cli::generate::Args),
    /// Serve the OpenAI API with every worker in this process (the embedded deployment).
    Serve(cli::serve::Args),
    /// Run the OpenAI frontend and router of a distributed deployment (etcd + NATS).
    Frontend(cli::frontend::Args),
    /// Run one worker of a distributed deployment (etcd + NATS).
    Worker(cli::worker::Args),
    /// Benchmark an OpenAI endpoint, or engines in-process, over a concurrency sweep.
    Bench(cli::bench::Args),
    /// Draw Pareto frontiers and the gain table from benchmark artifacts.
    Pareto(cli::pareto::Args),
    /// Compare an aggregated and a disaggregated deployment of a small model, end to end.
    Demo(cli::demo::Args),
    /// Time the CUDA backend's decode and prefill steps (prints JSON).
    #[command(hide = true)]
    BenchStep(cli::bench_step::Args),
    /// Time the FP8 product paths on a model's linear shapes (prints JSON).
    #[command(hide = true)]
    BenchGemm(cli::bench_gemm::Args),
    /// Compile the CUDA kernels with NVRTC (a CI check; needs no GPU).
    #[command(hide = true)]
    Kernels(cli::kernels::Args),
    /// A mock OpenAI server with fixed TTFT/ITL (tests, load-generator checks, vLLM stand-in).
    #[command(hide = true)]
    MockServer(cli::mock_server::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(a) => cli::generate::run(a),
        Command::Serve(a) => cli::serve::run(a),
        Command::Frontend(a) => cli::frontend::run(a),
        Command::Worker(a) => cli::worker::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Pareto(a) => cli::pareto::run(a),
        Command::Demo(a) => cli::demo::run(a),
        Command::Kernels(a) => cli::kernels::run(a),
        Command::BenchStep(a) => cli::bench_step::run(a),
        Command::BenchGemm(a) => cli::bench_gemm::run(a),
        Command::MockServer(a) => cli::mock_server::run(a),
    }
}
