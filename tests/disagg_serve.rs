//! `tandem serve -f benchmarks/disagg.yaml`: the embedded disaggregated deployment, in one
//! process with no etcd or NATS, answers with the same greedy tokens as `benchmarks/agg.yaml`.

mod frontend_support;

use frontend_support::Served;
use std::time::Duration;

async fn complete(url: &str, prompt: &[u32], max_tokens: usize) -> serde_json::Value {
    complete_with(
        url,
        serde_json::json!({"prompt": prompt, "max_tokens": max_tokens}),
    )
    .await
}

async fn complete_with(url: &str, mut body: serde_json::Value) -> serde_json::Value {
    body["model"] = "tiny-llama".into();
    body["temperature"] = 0.into();
    body["ignore_eos"] = true.into();
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn token_ids(v: &serde_json::Value) -> Vec<String> {
    v["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("logprobs tokens")
        .iter()
        .map(|t| t.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_disaggregated_serve_answers_like_aggregated() {
    let startup = Duration::from_secs(60);
    let agg = Served::start(&["-f", "benchmarks/agg.yaml"], startup);
    let disagg = Served::start(&["-f", "benchmarks/disagg.yaml"], startup);
    // Prompts of 10 to 300 tokens: below and above the file's max_local_prefill_length (32).
    for (i, len) in [10usize, 40, 120, 300].into_iter().enumerate() {
        let prompt: Vec<u32> = (0..len)
            .map(|j| ((j * 13 + i * 71 + 3) % 500) as u32)
            .collect();
        let (a, d) = tokio::join!(
            complete(&agg.url, &prompt, 10),
            complete(&disagg.url, &prompt, 10)
        );
        assert_eq!(
            a["choices"][0]["text"], d["choices"][0]["text"],
            "prompt of {len} tokens"
        );
        // Logprobs are asked for: the decode worker then prefills itself (the remote prefill
        // returns no logprobs for the first token), and all of them are there.
        let with_logprobs = serde_json::json!({"prompt": prompt, "max_tokens": 10, "logprobs": 1});
        let (a, d) = tokio::join!(
            complete_with(&agg.url, with_logprobs.clone()),
            complete_with(&disagg.url, with_logprobs)
        );
        assert_eq!(token_ids(&a), token_ids(&d), "prompt of {len} tokens");
        assert_eq!(token_ids(&d).len(), 10);
        assert_eq!(d["usage"]["completion_tokens"], 10);
    }
    // Many at once through the remote path, then everything is free again.
    let prompts: Vec<Vec<u32>> = (0..12)
        .map(|i| (0..80).map(|j| ((j * 7 + i * 31) % 500) as u32).collect())
        .collect();
    let answers =
        futures::future::join_all(prompts.iter().map(|p| complete(&disagg.url, p, 6))).await;
    assert!(answers.iter().all(|a| a["usage"]["completion_tokens"] == 6));
}
