//! `tandem mock-server` (hidden): a mock OpenAI server with fixed TTFT and ITL, for tests and the
//! load-generator check. Also accepts `serve MODEL ... --port P` so it can stand in for `vllm`.

use crate::bench::mock_server::{self, MockConfig};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, default_value_t = 0.0)]
    pub ttft_ms: f64,
    #[arg(long, default_value_t = 0.0)]
    pub itl_ms: f64,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// `serve MODEL [vLLM flags]`, as the vLLM launcher passes them; `--host`/`--port` among them
    /// are honoured, the rest ignored.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub vllm_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (mut host, mut port) = (args.host.clone(), args.port);
    let mut model = "mock".to_string();
    let rest = &args.vllm_args;
    for (i, a) in rest.iter().enumerate() {
        match (a.as_str(), rest.get(i + 1)) {
            ("--port", Some(v)) => port = v.parse()?,
            ("--host", Some(v)) => host = v.clone(),
            _ if i == 1 && rest[0] == "serve" && !a.starts_with('-') => model = a.clone(),
            _ => {}
        }
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    rt.enable_all().build()?.block_on(async move {
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("cannot resolve {host}"))?;
        let cfg = MockConfig {
            ttft: Duration::from_secs_f64(args.ttft_ms / 1e3),
            itl: Duration::from_secs_f64(args.itl_ms / 1e3),
            model,
        };
        let server = mock_server::start(addr, cfg).await?;
        eprintln!("mock OpenAI server on {}", server.url());
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
