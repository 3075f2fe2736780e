//! `tandem serve` on the tiny CPU model, end to end: the official OpenAI client in both modes,
//! greedy tokens equal to `tandem generate`'s and an in-process engine's, 1,000 concurrent streams with the KV pool all
//! free afterwards, and a hang-up that frees its blocks.

mod frontend_support;

use frontend_support::{hammer, health_status, metric_sum, openai_python, run_client, Served};
use futures::StreamExt;
use std::time::Duration;
use tandem::backend::factory::create_backend;
use tandem::backend::DeviceKind;
use tandem::engine::types::{GenerateRequest, SamplingParams};
use tandem::engine::{Engine, EngineConfig};
use tandem::model::{load_weights, LoadFormat, ModelFiles};

const STARTUP: Duration = Duration::from_secs(60);

fn serve(extra: &[&str]) -> Served {
    let mut args = vec![
        "--model",
        "tiny-llama",
        "--load-format",
        "dummy",
        "--block-size",
        "16",
    ];
    args.extend_from_slice(extra);
    Served::start(&args, STARTUP)
}

async fn metrics(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Greedy tokens from `tandem generate` (the backend driven directly, no engine, no HTTP).
fn generate_cli_tokens(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "generate",
            "--model",
            "tiny-llama",
            "--load-format",
            "dummy",
            "--block-size",
            "16",
        ])
        .args([
            "--prompt-tokens",
            &ids.join(","),
            "--max-tokens",
            &max_tokens.to_string(),
        ])
        .args(["--ignore-eos", "--json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run tandem generate");
    assert!(
        out.status.success(),
        "tandem generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("generate --json output");
    serde_json::from_value(v["tokens"].clone()).unwrap()
}

/// Greedy tokens of the same model on an engine built in this process.
async fn reference_tokens(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let files = ModelFiles::resolve("tiny-llama").unwrap();
    let weights = load_weights(&files, LoadFormat::Dummy, 0).unwrap();
    let backend = create_backend(DeviceKind::Cpu, &files.config, &weights, 16, 64).unwrap();
    let engine = Engine::start(backend, None, EngineConfig::default());
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let req = GenerateRequest {
        id: "ref".into(),
        prompt_tokens: prompt.to_vec(),
        params,
    };
    let outs: Vec<_> = engine.generate(req).unwrap().collect().await;
    engine.shutdown();
    outs.into_iter()
        .flat_map(|o| o.unwrap().token_ids)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_against_tandem_serve() {
    let Some(python) = openai_python() else {
        return;
    };
    let served = serve(&[
        "--num-workers",
        "2",
        "--router-mode",
        "kv-aware",
        "--max-model-len",
        "512",
    ]);
    let url = served.url.clone();
    let summary = tokio::task::spawn_blocking(move || run_client(&python, &url, "tiny-llama"))
        .await
        .unwrap();
    let http: Vec<u32> =
        serde_json::from_value(summary["ids_completion_token_ids"].clone()).unwrap();
    let prompt = [1, 45, 74, 31, 34, 33];
    assert_eq!(
        http,
        generate_cli_tokens(&prompt, 12),
        "the client's greedy tokens"
    );
    assert!(
        !summary["chat_text"].as_str().unwrap().is_empty(),
        "the tokenizer decodes text"
    );

    // Bad input leaves the server up and the pool empty.
    let client = reqwest::Client::new();
    let too_long = client
        .post(format!("{}/v1/completions", served.url))
        .json(&serde_json::json!({"prompt": vec![1u32; 500], "max_tokens": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(too_long.status(), 400);
    let msg = too_long.text().await.unwrap();
    assert!(
        msg.contains("512") && msg.contains("500") && msg.contains("20"),
        "{msg}"
    );
    let bad_id = client
        .post(format!("{}/v1/completions", served.url))
        .json(&serde_json::json!({"prompt": [100000], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        bad_id.status(),
        400,
        "token ids outside the vocabulary are the engine's 400"
    );
    assert_eq!(health_status(&served.url), Some(200));
    let m = metrics(&served.url).await;
    assert_eq!(metric_sum(&m, "tandem_kv_blocks_active{"), 0.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_http_tokens_equal_generate() {
    let served = serve(&["--num-workers", "2"]);
    let prompt = [1u32, 45, 74, 31, 34, 33];
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let resp: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/completions", served.url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let http: Vec<u32> = serde_json::from_value(resp["choices"][0]["token_ids"].clone()).unwrap();
    assert_eq!(http.len(), 12, "{resp}");
    assert_eq!(
        http,
        generate_cli_tokens(&prompt, 12),
        "greedy tokens over HTTP equal `tandem generate`'s"
    );
    assert_eq!(
        http,
        reference_tokens(&prompt, 12).await,
        "and an in-process engine's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_on_the_tiny_model() {
    let served = serve(&[
        "--num-workers",
        "2",
        "--router-mode",
        "least-loaded",
        "--max-num-seqs",
        "256",
    ]);
    let started = std::time::Instant::now();
    let ok = hammer(&served.url, 1000, 4).await;
    println!("1000 streams in {:?}", started.elapsed());
    assert_eq!(ok, 1000, "every stream completes with its 4 tokens");
    let m = metrics(&served.url).await;
    assert_eq!(
        metric_sum(&m, "tandem_requests_total{status=\"200\"}"),
        1000.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "tandem_kv_blocks_active{"),
        0.0,
        "KV pool all free: {m}"
    );
    assert_eq!(metric_sum(&m, "tandem_running_requests{"), 0.0);
    assert_eq!(metric_sum(&m, "tandem_queue_length{"), 0.0);
    assert_eq!(metric_sum(&m, "tandem_router_in_flight{"), 0.0);
    assert!(metric_sum(&m, "tandem_time_to_first_token_seconds_count") >= 1000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_up_frees_the_requests_blocks() {
    let served = serve(&[]);
    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", served.url))
        .json(&serde_json::json!({"prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.chunk().await.unwrap().is_some());
    // The engine publishes its metrics after each step, so wait for the first to show the request.
    let mut busy = false;
    for _ in 0..100 {
        if metric_sum(&metrics(&served.url).await, "tandem_kv_blocks_active{") > 0.0 {
            busy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(busy, "the request never showed up in the engine's metrics");
    drop(resp);
    let mut freed = false;
    for _ in 0..100 {
        let m = metrics(&served.url).await;
        if metric_sum(&m, "tandem_kv_blocks_active{") == 0.0
            && metric_sum(&m, "tandem_running_requests{") == 0.0
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "the cancelled request still holds KV blocks");
    let m = metrics(&served.url).await;
    assert_eq!(
        metric_sum(&m, "tandem_requests_total{status=\"499\"}"),
        1.0,
        "counted as a hang-up: {m}"
    );
    assert_eq!(health_status(&served.url), Some(200));
}

/// `cached_tokens` of each of `n` identical requests sent one after another.
async fn cached_tokens_of_repeats(url: &str, n: usize) -> Vec<u64> {
    let prompt: Vec<u32> = (1..70).collect();
    let mut cached = vec![];
    for _ in 0..n {
        let v: serde_json::Value = reqwest::Client::new()
            .post(format!("{url}/v1/completions"))
            .json(&serde_json::json!({"prompt": prompt, "max_tokens": 2}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        cached.push(
            v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        );
    }
    cached
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_aware_routing_finds_the_cached_prefix() {
    // 69 tokens = 4 full blocks of 16 that the prefix cache can share.
    let kv = serve(&["--num-workers", "2", "--router-mode", "kv-aware"]);
    assert_eq!(cached_tokens_of_repeats(&kv.url, 4).await, [0, 64, 64, 64]);
    let m = metrics(&kv.url).await;
    let rates: Vec<f64> = m
        .lines()
        .filter(|l| l.starts_with("tandem_prefix_cache_hit_rate{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(rates.len(), 2, "{m}");
    assert_eq!(
        rates.iter().filter(|&&r| r > 0.0).count(),
        1,
        "one worker served them all: {m}"
    );
    // Round-robin sends the second copy to the other, cold worker.
    let rr = serve(&["--num-workers", "2", "--router-mode", "round-robin"]);
    assert_eq!(cached_tokens_of_repeats(&rr.url, 2).await, [0, 0]);
}
