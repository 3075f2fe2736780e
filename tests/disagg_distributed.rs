//! `tandem worker` processes on etcd + NATS with the tiny CPU model: remote prefill gives the
//! tokens of an aggregated engine, also when the KV is cut for a TP2 destination.

mod disagg_support;

use disagg_support::*;
use std::time::Duration;
use tandem::engine::types::GenerateRequest;
use tandem::worker::remote::RemoteWorker;
use tandem::worker::WorkerClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_greedy_tokens_equal_aggregated_tp1_and_tp_mismatched() {
    let Some(servers) = start_servers() else {
        return;
    };
    let ns = "same-tokens";
    let _prefill = spawn_worker(&servers, ns, "prefill", "prefill-0", &[]);
    let _tp1 = spawn_worker(
        &servers,
        ns,
        "decode",
        "decode-tp1",
        &["--no-conditional-disagg"],
    );
    let _tp2 = spawn_worker(
        &servers,
        ns,
        "decode",
        "decode-tp2",
        &["--no-conditional-disagg", "--kv-ranks", "2"],
    );
    let rt = connect(&servers, ns).await;
    wait_registered(&rt, &["prefill-0", "decode-tp1", "decode-tp2"]).await;

    let reference = tandem::worker::LocalWorker::new("reference", reference_engine());
    let cases: Vec<(GenerateRequest, Vec<u32>)> = futures::future::join_all((0..6).map(|i| {
        let req = request(&format!("r{i}"), prompt(i, 20 + 57 * i), 12);
        let reference = reference.clone();
        async move {
            let want = tokens_of(&reference, req.clone()).await;
            (req, want)
        }
    }))
    .await;
    assert!(cases.iter().all(|(_, want)| want.len() == 12));

    let prefill = RemoteWorker::connect(rt.clone(), "prefill-0")
        .await
        .unwrap();
    for id in ["decode-tp1", "decode-tp2"] {
        let worker = RemoteWorker::connect(rt.clone(), id).await.unwrap();
        let steps_before = {
            tokio::time::sleep(Duration::from_millis(400)).await;
            prefill.metrics().steps
        };
        let runs = cases.iter().map(|(req, want)| {
            let worker = &worker;
            let req = GenerateRequest {
                id: format!("{id}-{}", req.id),
                ..req.clone()
            };
            async move { (tokens_of(worker, req).await, want.clone()) }
        });
        for (i, (got, want)) in futures::future::join_all(runs)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(got, want, "{id}, request {i}");
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            prefill.metrics().steps > steps_before,
            "{id}: the prefill worker computed nothing"
        );
        wait_no_active_blocks(&worker).await;
    }
    wait_no_active_blocks(&prefill).await;
}

mod frontend_support;

async fn completion_text(url: &str, prompt: &[u32]) -> (String, serde_json::Value) {
    let body = serde_json::json!({"model": "tiny-llama", "prompt": prompt, "max_tokens": 10,
        "temperature": 0, "ignore_eos": true});
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    (
        v["choices"][0]["text"].as_str().unwrap().to_string(),
        v["usage"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_with_prefill_and_decode_processes_answers_like_aggregated_serve() {
    let Some(servers) = start_servers() else {
        return;
    };
    let ns = "http";
    let _prefill = spawn_worker(&servers, ns, "prefill", "prefill-0", &[]);
    let _decode = spawn_worker(
        &servers,
        ns,
        "decode",
        "decode-0",
        &["--no-conditional-disagg"],
    );
    let mut args: Vec<String> = [
        "frontend",
        "--namespace",
        ns,
        "--model",
        MODEL,
        "--served-model-name",
        "tiny-llama",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--etcd", &servers.etcd_url, "--nats", &servers.nats_url].map(String::from));
    args.extend(
        [
            "--port",
            "0",
            "--max-model-len",
            "2048",
            "--wait-for-workers",
            "60",
        ]
        .map(String::from),
    );
    let frontend = Proc::spawn("frontend", &args);
    let url = frontend_url(&frontend);
    let agg = frontend_support::Served::start(
        &[
            "--model",
            "tiny-llama",
            "--served-model-name",
            "tiny-llama",
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
        ],
        Duration::from_secs(60),
    );
    for len in [5, 60, 250] {
        let p = prompt(len, len);
        let (disagg, usage) = completion_text(&url, &p).await;
        let (aggregated, _) = completion_text(&agg.url, &p).await;
        assert_eq!(disagg, aggregated, "prompt of {len} tokens");
        assert_eq!(usage["completion_tokens"], 10);
    }
    // The router follows the directory: the decode worker is listed in /metrics.
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("decode-0"), "{metrics}");
    // The official OpenAI client: the same results from both deployments.
    if let Some(python) = frontend_support::openai_python() {
        let (u1, u2) = (url.clone(), agg.url.clone());
        let (d, a) = tokio::task::spawn_blocking(move || {
            (
                frontend_support::run_client(&python, &u1, "tiny-llama"),
                frontend_support::run_client(&python, &u2, "tiny-llama"),
            )
        })
        .await
        .unwrap();
        for key in ["chat_text", "completion_text", "ids_completion_token_ids"] {
            assert_eq!(d[key], a[key], "{key}");
        }
    }
}
