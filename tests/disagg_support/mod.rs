//! Starting nats-server and etcd for tests, on free ports in temp dirs; killed on drop.
#![allow(dead_code)]

use clap::Parser;
use futures::StreamExt;
use std::collections::HashSet;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::cli::common::{EngineArgs, ModelArgs};
use tandem::engine::types::{GenerateRequest, SamplingParams};
use tandem::engine::EngineHandle;
use tandem::runtime::distributed::{DistributedConfig, DistributedRuntime};
use tandem::runtime::{DiscoveryEvent, Runtime};
use tandem::worker::remote::RemoteWorker;
use tandem::worker::WorkerClient;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `binary` is on PATH; without it the test panics under CI and is skipped otherwise.
pub fn require(binary: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {binary}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("`{binary}` is not installed (CI is set): install it (`.ci/run` does)");
        }
        eprintln!("SKIPPED: `{binary}` is not installed");
    }
    found
}

fn wait_for_port(port: u16, what: &str) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{what} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One server process that can be killed and started again with the same port and data.
pub struct Server {
    name: &'static str,
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(name: &'static str, args: Vec<String>, port: u16, dir: tempfile::TempDir) -> Self {
        let mut s = Self {
            name,
            args,
            port,
            child: None,
            _dir: dir,
        };
        s.restart();
        s
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        let log =
            std::fs::File::create(self._dir.path().join(format!("{}.log", self.name))).unwrap();
        let child = Command::new(self.name)
            .args(&self.args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.child = Some(child);
        wait_for_port(self.port, self.name);
    }

    pub fn dir(&self) -> PathBuf {
        self._dir.path().to_path_buf()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Servers {
    pub nats: Server,
    pub etcd: Server,
    pub nats_url: String,
    pub etcd_url: String,
}

/// Starts both servers; `None` (after a printed message) when one is not installed outside CI.
pub fn start_servers() -> Option<Servers> {
    if !require("nats-server") || !require("etcd") {
        return None;
    }
    let nats_port = free_port();
    let nats_dir = tempfile::tempdir().unwrap();
    let nats_args = vec![
        "-js".into(),
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        nats_port.to_string(),
        "-sd".into(),
        nats_dir.path().join("js").display().to_string(),
    ];
    let nats = Server::start("nats-server", nats_args, nats_port, nats_dir);

    let (client, peer) = (free_port(), free_port());
    let etcd_dir = tempfile::tempdir().unwrap();
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let etcd_args = vec![
        "--name".into(),
        "test".into(),
        "--data-dir".into(),
        etcd_dir.path().join("data").display().to_string(),
        "--listen-client-urls".into(),
        client_url.clone(),
        "--advertise-client-urls".into(),
        client_url.clone(),
        "--listen-peer-urls".into(),
        peer_url.clone(),
        "--initial-advertise-peer-urls".into(),
        peer_url.clone(),
        "--initial-cluster".into(),
        format!("test={peer_url}"),
    ];
    let etcd = Server::start("etcd", etcd_args, client, etcd_dir);
    Some(Servers {
        nats,
        etcd,
        nats_url: format!("nats://127.0.0.1:{nats_port}"),
        etcd_url: client_url,
    })
}

/// A `tandem` child process, killed on drop; its output goes to a log file in a temp dir.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    pub fn spawn(name: &str, args: &[String]) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.into(),
            child,
            log,
            _dir: dir,
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log());
        }
        self.kill();
    }
}

pub const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llama");

/// Model and engine flags every test worker (and the in-process reference) uses.
pub fn model_flags() -> Vec<String> {
    [
        "--model",
        MODEL,
        "--load-format",
        "dummy",
        "--device",
        "cpu",
        "--block-size",
        "16",
        "--num-kv-blocks",
        "512",
        "--max-model-len",
        "2048",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts `tandem worker --role ROLE` on the test servers under `namespace`.
pub fn spawn_worker(
    servers: &Servers,
    namespace: &str,
    role: &str,
    id: &str,
    extra: &[&str],
) -> Proc {
    let mut args: Vec<String> = [
        "worker",
        "--role",
        role,
        "--worker-id",
        id,
        "--namespace",
        namespace,
        "--lease-ttl",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--etcd".into(),
        servers.etcd_url.clone(),
        "--nats".into(),
        servers.nats_url.clone(),
    ]);
    args.extend(model_flags());
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(id, &args)
}

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

/// An aggregated engine in this process with the workers' model and flags.
pub fn reference_engine() -> EngineHandle {
    let flags = Flags::parse_from(std::iter::once("ref".to_string()).chain(model_flags()));
    tandem::cli::worker::build_engine(&flags.model, &flags.engine)
        .unwrap()
        .0
}

pub async fn connect(servers: &Servers, namespace: &str) -> Arc<dyn Runtime> {
    let config = DistributedConfig {
        namespace: namespace.into(),
        lease_ttl: Duration::from_secs(2),
        ..DistributedConfig::new(&servers.etcd_url, &servers.nats_url)
    };
    Arc::new(DistributedRuntime::connect(&config).await.unwrap())
}

pub async fn wait_registered(rt: &Arc<dyn Runtime>, ids: &[&str]) {
    let mut events = rt.watch().await.unwrap();
    let mut missing: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(DiscoveryEvent::Up(i))) => {
                missing.remove(&i.id);
            }
            Ok(Some(_)) => {}
            _ => panic!("workers never registered: {missing:?}"),
        }
    }
}

pub fn request(id: &str, prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    let params = SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    GenerateRequest {
        id: id.into(),
        prompt_tokens: prompt,
        params,
    }
}

pub fn prompt(seed: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 31 + seed * 97 + 5) % 500) as u32)
        .collect()
}

pub async fn tokens_of(worker: &dyn WorkerClient, req: GenerateRequest) -> Vec<u32> {
    let mut stream = worker.generate(req).await.expect("accepted");
    let mut tokens = Vec::new();
    while let Some(piece) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("no output in 30 s")
    {
        tokens.extend(piece.expect("no error").token_ids);
    }
    tokens
}

pub async fn wait_no_active_blocks(worker: &RemoteWorker) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = worker.metrics();
        if m.kv_blocks_total > 0 && m.kv_blocks_active == 0 && m.running == 0 && m.waiting == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: KV blocks still held: {m:?}",
            worker.id()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `tandem frontend` to print its address, then for `/health`.
pub fn frontend_url(proc: &Proc) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = proc.log();
        let listening = log
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next());
        if let Some(url) = listening {
            if http_health(url) == Some(200) {
                return url.to_string();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the frontend never came up:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Status of `GET /health`, over a plain socket.
pub fn http_health(url: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let addr = url.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
