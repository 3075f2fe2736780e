//! The vLLM baseline launcher, with `tandem mock-server` standing in for `vllm`.

mod bench_common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tandem");

fn bench(dir: &Path, extra: &[&str]) -> Command {
    let tok = dir.join("tok");
    bench_common::write_word_tokenizer(&tok);
    let mut cmd = Command::new(BIN);
    cmd.args([
        "bench",
        "--model",
        "org/mock",
        "--isl",
        "8",
        "--osl",
        "4",
        "--concurrency",
        "2",
    ])
    .args(["--balancer-port", "0", "--no-progress", "--tokenizer"])
    .arg(&tok)
    .arg("--artifact-dir")
    .arg(dir.join("art"))
    .args(extra);
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Pids from the launcher's "started ... (pid N, ...)" lines.
fn started_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.split("(pid ").nth(1)?.split(',').next()?.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    // A reaped or never-started pid has no /proc entry; a zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn launches_instances_behind_balancer_sweeps_and_stops_them() {
    let dir = tempfile::tempdir().unwrap();
    let port = bench_common::free_port_pair();
    let exe = format!("{BIN} mock-server");
    // A server that is already running (e.g. on a second node) joins through --upstream.
    let other = bench_common::free_port_pair();
    let mut second_node = Command::new(BIN)
        .args(["mock-server", "--port", &other.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while port_free(other) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = bench(
        dir.path(),
        &[
            "--launch-vllm",
            "org/mock --tensor-parallel-size 2 --block-size 128",
        ],
    )
    .args([
        "--vllm-executable",
        &exe,
        "--vllm-gpus",
        "0-1,2-3",
        "--vllm-base-port",
        &port.to_string(),
    ])
    .args(["--upstream", &format!("127.0.0.1:{other}")])
    .output()
    .unwrap();
    let stats = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let url = format!("http://127.0.0.1:{other}/mock/stats");
        reqwest::get(url).await?.json::<serde_json::Value>().await
    });
    second_node.kill().unwrap();
    second_node.wait().unwrap();
    let log = text(&out);
    let stats = stats.unwrap();
    assert!(
        stats["requests"].as_u64().unwrap() > 0,
        "the --upstream server got requests: {stats}"
    );
    assert!(out.status.success(), "{log}");
    assert!(log.contains("2 instance(s) healthy"), "{log}");
    let pids = started_pids(&log);
    assert_eq!(pids.len(), 2, "{log}");
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "instances still running after the sweep: {pids:?}"
    );
    assert!(port_free(port) && port_free(port + 1));

    let art = dir.path().join("art");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("deployment_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (cfg["kind"].as_str(), cfg["tp"].as_u64(), cfg["dp"].as_u64()),
        (Some("vllm"), Some(2), Some(3))
    );
    let run = art.join("org_mock-openai-chat-concurrency2");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("profile_export_genai_perf.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["request_count"]["avg"], 20.0);
    assert_eq!(json["output_sequence_length"]["avg"], 4.0);
    assert!(art.join("vllm_0.log").is_file() && art.join("vllm_1.log").is_file());
    assert!(
        log.contains("concurrency"),
        "the summary table is printed: {log}"
    );
}

#[test]
fn missing_vllm_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench(dir.path(), &["--launch-vllm", "org/mock"])
        .env("PATH", dir.path())
        .output()
        .unwrap();
    let log = text(&out);
    assert!(!out.status.success());
    assert!(
        log.contains("`vllm` was not found on PATH") && log.contains("--vllm-executable"),
        "{log}"
    );

    let out = bench(
        dir.path(),
        &[
            "--launch-vllm",
            "org/mock",
            "--vllm-executable",
            "/no/such/vllm",
        ],
    )
    .output()
    .unwrap();
    assert!(
        text(&out).contains("`/no/such/vllm` was not found"),
        "{}",
        text(&out)
    );
}

#[test]
fn an_instance_that_dies_fails_the_launch_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let port = bench_common::free_port_pair();
    let exe = format!("{BIN} no-such-subcommand");
    let out = bench(
        dir.path(),
        &["--launch-vllm", "org/mock", "--vllm-executable", &exe],
    )
    .args(["--vllm-base-port", &port.to_string()])
    .output()
    .unwrap();
    let log = text(&out);
    assert!(!out.status.success());
    assert!(
        log.contains("instance 0 exited") && log.contains("no-such-subcommand"),
        "{log}"
    );
}

#[test]
fn ctrl_c_stops_the_instances() {
    let dir = tempfile::tempdir().unwrap();
    let port = bench_common::free_port_pair();
    // Slow instances: the sweep is still running when the interrupt comes.
    let exe = format!("{BIN} mock-server --ttft-ms 5000");
    let mut child = bench(
        dir.path(),
        &["--launch-vllm", "org/mock", "--vllm-executable", &exe],
    )
    .args(["--vllm-gpus", "0,1", "--vllm-base-port", &port.to_string()])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while port_free(port) || port_free(port + 1) {
        assert!(Instant::now() < deadline, "instances never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "bench did not exit after Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let log = text(&out);
    assert!(!out.status.success());
    assert!(log.contains("interrupted"), "{log}");
    let pids = started_pids(&log);
    assert_eq!(pids.len(), 2, "{log}");
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "instances still running after Ctrl-C: {pids:?}"
    );
}

#[test]
fn in_process_cli_then_pareto_cli() {
    let dir = tempfile::tempdir().unwrap();
    let run = |art: &str, extra: &[&str]| {
        let out = Command::new(BIN)
            .args([
                "bench",
                "--in-process",
                "--model",
                "tiny-llama",
                "--load-format",
                "dummy",
            ])
            .args([
                "--device",
                "cpu",
                "--block-size",
                "16",
                "--isl",
                "16",
                "--osl",
                "4",
            ])
            .args([
                "--concurrency",
                "1,2",
                "--request-count",
                "4",
                "--no-progress",
            ])
            .arg("--artifact-dir")
            .arg(dir.path().join(art))
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    run("agg", &["--dp", "2"]);
    run(
        "disagg",
        &[
            "--mode",
            "disaggregated",
            "--prefill-dp",
            "1",
            "--decode-dp",
            "1",
        ],
    );
    let cfg = std::fs::read_to_string(dir.path().join("disagg/deployment_config.json")).unwrap();
    assert!(cfg.contains("\"mode\": \"disaggregated\""), "{cfg}");
    let out = Command::new(BIN)
        .args(["pareto", "--output-dir"])
        .arg(dir.path().join("out"))
        .arg(dir.path().join("agg"))
        .arg(dir.path().join("disagg"))
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("baseline: agg (2 GPUs)"), "{log}");
    assert!(dir.path().join("out/pareto_plot.png").is_file());
    assert!(dir.path().join("out/results.csv").is_file());
}

#[test]
fn bench_against_tandem_serve() {
    let dir = tempfile::tempdir().unwrap();
    let port = bench_common::free_port_pair();
    let mut serve = Command::new(BIN)
        .args([
            "serve",
            "--model",
            "tiny-llama",
            "--load-format",
            "dummy",
            "--device",
            "cpu",
        ])
        .args(["--block-size", "16", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while port_free(port) {
        assert!(Instant::now() < deadline, "tandem serve did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new(BIN)
        .args([
            "bench",
            "--url",
            &format!("127.0.0.1:{port}"),
            "--model",
            "tiny-llama",
        ])
        .args([
            "--isl",
            "32",
            "--osl",
            "16",
            "--concurrency",
            "1,4",
            "--no-progress",
        ])
        .arg("--artifact-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    serve.kill().unwrap();
    serve.wait().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let run = dir.path().join("tiny-llama-openai-chat-concurrency1");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("profile_export_genai_perf.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        json["input_sequence_length"]["avg"], 32.0,
        "prompts are exact for the model's tokenizer"
    );
    let osl = json["output_sequence_length"]["avg"].as_f64().unwrap();
    // Counted from the streamed text: special tokens the dummy model samples stream no text.
    assert!((12.0..=16.0).contains(&osl), "output sequence length {osl}");
    // A tiny model answers in a few ms; ~40 ms would mean small writes wait on delayed ACKs.
    let ttft_p50 = json["time_to_first_token"]["p50"].as_f64().unwrap();
    assert!(ttft_p50 < 35.0, "TTFT p50 {ttft_p50} ms");
}
