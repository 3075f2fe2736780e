//! Helpers shared by the frontend's integration tests: the OpenAI Python client, a spawned
//! `tandem serve`, a load generator and a `/metrics` reader.
#![allow(dead_code)]

use futures::StreamExt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The venv's python with `openai` importable; `None` (skip, with a message) outside CI.
pub fn openai_python() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = python.exists()
        && Command::new(&python)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    let why = format!(
        "{} with the `openai` package is missing (run .ci/run)",
        python.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    println!("SKIPPED: {why}");
    None
}

/// Runs tests/openai_client.py against `url`; returns its JSON summary.
pub fn run_client(python: &Path, url: &str, model: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .args([url, model])
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("the script's JSON summary")
}

/// A `tandem serve` child process, killed when dropped.
pub struct Served {
    pub child: Child,
    pub url: String,
}

impl Served {
    /// Starts `tandem serve ARGS --port 0` and waits (up to `timeout`) for its address and /health.
    pub fn start(args: &[&str], timeout: Duration) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("serve")
            .args(args)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tandem serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = match rx.recv_timeout(timeout) {
            Ok(url) => url,
            Err(_) => {
                let exited = child.try_wait().ok().flatten();
                let _ = child.kill();
                match exited {
                    Some(status) => panic!("tandem serve exited ({status}) before listening"),
                    None => panic!("tandem serve printed no address within {timeout:?}"),
                }
            }
        };
        let served = Served { child, url };
        let deadline = Instant::now() + timeout;
        loop {
            if health_status(&served.url) == Some(200) {
                return served;
            }
            assert!(
                Instant::now() < deadline,
                "/health not OK within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status of `GET /health`, over a plain socket (the tests' reqwest is async only).
pub fn health_status(url: &str) -> Option<u16> {
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

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

/// Sum of a metric's samples whose line starts with `prefix` (name plus optional labels).
pub fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends `n` concurrent streaming completions of `max_tokens` forced tokens each; returns how
/// many completed with the right token count, `[DONE]` and no error.
pub async fn hammer(url: &str, n: usize, max_tokens: usize) -> usize {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let tasks = (0..n).map(|i| {
        let client = client.clone();
        let url = format!("{url}/v1/completions");
        tokio::spawn(async move {
            let body = serde_json::json!({
                "prompt": [1, 2 + (i % 50) as u32, 3, 4], "max_tokens": max_tokens, "stream": true,
                "stream_options": {"include_usage": true}, "nvext": {"ignore_eos": true},
            });
            let resp = client.post(&url).json(&body).send().await.ok()?;
            if resp.status() != 200 {
                return None;
            }
            let mut text = String::new();
            let mut bytes = resp.bytes_stream();
            while let Some(chunk) = bytes.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.ok()?));
            }
            let data = sse_data(&text);
            let done = data.last().is_some_and(|d| d == "[DONE]");
            let usage: serde_json::Value =
                serde_json::from_str(data.get(data.len().checked_sub(2)?)?).ok()?;
            let ok = done
                && usage["usage"]["completion_tokens"] == max_tokens
                && !text.contains("\"error\"");
            ok.then_some(())
        })
    });
    let results = futures::future::join_all(tasks).await;
    results
        .into_iter()
        .filter(|r| matches!(r, Ok(Some(()))))
        .count()
}
