//! `tandem serve` on the tiny CPU model, end to end: the official OpenAI client in both modes,
//! greedy tokens equal to an in-process engine's, 1,000 concurrent streams with the KV pool all
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

/// Greedy tokens of the same model built in this process (what `tandem generate` runs).
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
        reference_tokens(&prompt, 12).await,
        "greedy tokens over HTTP equal the engine's"
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
