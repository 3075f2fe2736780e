//! Starts the external vLLM baseline: `vllm serve` instances on given GPUs (one process group
//! each, logs in files), waits for `/health`, and stops them (SIGTERM, then SIGKILL) when dropped,
//! so an error or Ctrl-C never leaves them running.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct VllmLaunch {
    /// The program and any leading arguments, e.g. `vllm` or `/path/tandem mock-server`.
    pub executable: Vec<String>,
    /// Arguments after `serve`, e.g. `MODEL --tensor-parallel-size 4 --block-size 128`.
    pub serve_args: Vec<String>,
    /// Used as the positional model when `serve_args` names none.
    pub model: String,
    /// One entry per instance: its `CUDA_VISIBLE_DEVICES` (empty: leave unset).
    pub gpu_groups: Vec<Vec<usize>>,
    pub host: String,
    /// Instance i listens on `base_port + i`.
    pub base_port: u16,
    pub startup_timeout: Duration,
    /// Where `vllm_<i>.log` go.
    pub log_dir: PathBuf,
}

/// `0-3,4-7` → [[0,1,2,3],[4,5,6,7]]: instances separated by `,`, each a range `a-b`, a GPU
/// `a`, or GPUs joined by `+` (`0+2,1+3`).
pub fn parse_gpu_groups(spec: &str) -> Result<Vec<Vec<usize>>> {
    let bad = || format!("bad --vllm-gpus {spec:?}: expected e.g. 0-3,4-7 or 0+2,1+3");
    let mut groups = Vec::new();
    for group in spec.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        let mut gpus = Vec::new();
        for part in group.split('+') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b): (usize, usize) = (
                        a.trim().parse().with_context(bad)?,
                        b.trim().parse().with_context(bad)?,
                    );
                    if a > b {
                        bail!(bad());
                    }
                    gpus.extend(a..=b);
                }
                None => gpus.push(part.trim().parse().with_context(bad)?),
            }
        }
        groups.push(gpus);
    }
    if groups.is_empty() {
        bail!(bad());
    }
    Ok(groups)
}

/// The value of `--tensor-parallel-size`/`-tp` in vLLM arguments (1 when absent).
pub fn tensor_parallel_size(args: &[String]) -> Result<usize> {
    for (i, a) in args.iter().enumerate() {
        let value = match a.split_once('=') {
            Some((k, v)) if k == "--tensor-parallel-size" || k == "-tp" => Some(v.to_string()),
            _ if a == "--tensor-parallel-size" || a == "-tp" => args.get(i + 1).cloned(),
            _ => None,
        };
        if let Some(v) = value {
            return v
                .parse()
                .with_context(|| format!("bad --tensor-parallel-size {v:?}"));
        }
    }
    Ok(1)
}

/// Finds `program` on PATH (or checks the path when it has a `/`).
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = Path::new(program);
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// Running instances; dropping this stops them.
pub struct VllmFleet {
    children: Vec<Child>,
    pub urls: Vec<String>,
    log_files: Vec<PathBuf>,
}

impl VllmFleet {
    /// Spawns the instances (not yet healthy: call `wait_healthy`).
    pub fn spawn(cfg: &VllmLaunch) -> Result<Self> {
        let program = cfg.executable.first().context("empty --vllm-executable")?;
        let Some(resolved) = find_program(program) else {
            bail!(
                "`{program}` was not found{}: install vLLM (`pip install vllm`) or pass --vllm-executable PATH",
                if program.contains('/') { "" } else { " on PATH" }
            );
        };
        std::fs::create_dir_all(&cfg.log_dir)?;
        let mut args = cfg.serve_args.clone();
        let names_model = args.first().is_some_and(|a| !a.starts_with('-'))
            || args
                .iter()
                .any(|a| a == "--model" || a.starts_with("--model="));
        if !names_model {
            args.insert(0, cfg.model.clone());
        }
        let mut fleet = Self {
            children: vec![],
            urls: vec![],
            log_files: vec![],
        };
        for (i, gpus) in cfg.gpu_groups.iter().enumerate() {
            let port = cfg
                .base_port
                .checked_add(i as u16)
                .context("port out of range")?;
            if std::net::TcpListener::bind((cfg.host.as_str(), port)).is_err() {
                bail!(
                    "port {port} on {} is in use; choose another --vllm-base-port",
                    cfg.host
                );
            }
            let log_path = cfg.log_dir.join(format!("vllm_{i}.log"));
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let mut cmd = Command::new(&resolved);
            cmd.args(&cfg.executable[1..]).arg("serve").args(&args);
            cmd.args(["--host", &cfg.host, "--port", &port.to_string()]);
            if !gpus.is_empty() {
                let list: Vec<String> = gpus.iter().map(|g| g.to_string()).collect();
                cmd.env("CUDA_VISIBLE_DEVICES", list.join(","));
            }
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            // Own process group: stopping reaches vLLM's worker processes too.
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            let child = cmd
                .spawn()
                .with_context(|| format!("starting {}", resolved.display()))?;
            eprintln!(
                "started `{} serve` instance {i} (pid {}, port {port}), log {}",
                program,
                child.id(),
                log_path.display()
            );
            fleet.children.push(child);
            fleet.urls.push(format!("http://{}:{port}", cfg.host));
            fleet.log_files.push(log_path);
        }
        Ok(fleet)
    }

    /// Polls every instance's `/health` until all answer 200; fails when one exits or on timeout.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let deadline = Instant::now() + timeout;
        let mut healthy = vec![false; self.urls.len()];
        while healthy.iter().any(|h| !h) {
            for (i, healthy) in healthy.iter_mut().enumerate() {
                if *healthy {
                    continue;
                }
                if let Some(status) = self.children[i].try_wait()? {
                    bail!("instance {i} exited ({status}) before it was healthy; its log {} ends:\n{}",
                        self.log_files[i].display(), log_tail(&self.log_files[i]));
                }
                let url = format!("{}/health", self.urls[i]);
                *healthy = client
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
            }
            if Instant::now() > deadline {
                bail!(
                    "instances not healthy after {} s (see logs in {})",
                    timeout.as_secs(),
                    self.log_files[0]
                        .parent()
                        .unwrap_or(Path::new("."))
                        .display()
                );
            }
            if healthy.iter().any(|h| !h) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }

    /// SIGTERM to each process group, up to 30 s to exit, then SIGKILL.
    pub fn stop(&mut self) {
        for c in &self.children {
            signal_group(c.id(), "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for c in &mut self.children {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if c.try_wait().ok().flatten().is_none() {
                signal_group(c.id(), "KILL");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.children.clear();
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }
}

impl Drop for VllmFleet {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal_group(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), "--".into(), format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
