//! The HTTP API over mock workers: response shapes, SSE format, usage, stop, nvext, logprobs,
//! metrics.

use serde_json::{json, Value};
use std::sync::Arc;
use tandem::frontend::mock::{MockConfig, MockWorker, TestServer};
use tandem::frontend::router::RouterMode;
use tandem::frontend::tokenizer::{ByteTokenizer, ChatTurn, PromptTokenizer};
use tandem::frontend::FrontendConfig;
use tandem::worker::WorkerClient;

async fn server(config: MockConfig) -> (TestServer, Arc<MockWorker>) {
    let worker = MockWorker::new("w0", config);
    let s = TestServer::start(
        vec![worker.clone() as Arc<dyn WorkerClient>],
        FrontendConfig::new("mock", 256),
        RouterMode::RoundRobin,
        Some(Arc::new(ByteTokenizer)),
    )
    .await;
    (s, worker)
}

async fn post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", s.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The `data:` payloads of an SSE response, in order.
async fn post_sse(s: &TestServer, path: &str, body: Value) -> Vec<String> {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", s.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
        })
        .map(str::to_string)
        .collect()
}

fn expected_text(prompt: &[u32], n: usize) -> String {
    (0..n)
        .map(|i| MockWorker::text_of(MockWorker::token_at(prompt, i)))
        .collect()
}

fn chat_prompt(content: &str) -> Vec<u32> {
    let turns = [ChatTurn {
        role: "user".into(),
        content: content.into(),
    }];
    ByteTokenizer
        .encode(&ByteTokenizer.apply_chat_template(&turns).unwrap(), false)
        .unwrap()
}

#[tokio::test]
async fn chat_completion_whole() {
    let (s, _) = server(MockConfig::default()).await;
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let prompt = chat_prompt("hi");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "mock");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        expected_text(&prompt, 5)
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["usage"]["total_tokens"], prompt.len() + 5);
}

#[tokio::test]
async fn completions_accept_every_prompt_shape() {
    let (s, _) = server(MockConfig::default()).await;
    let cases = [
        (json!("ab"), vec![ByteTokenizer.encode("ab", true).unwrap()]),
        (
            json!(["ab", "c"]),
            vec![
                ByteTokenizer.encode("ab", true).unwrap(),
                ByteTokenizer.encode("c", true).unwrap(),
            ],
        ),
        (json!([5, 6, 7]), vec![vec![5, 6, 7]]),
        (json!([[5], [8, 9]]), vec![vec![5], vec![8, 9]]),
    ];
    for (prompt, prompts) in cases {
        let (status, body) = post(
            &s,
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 3}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "text_completion");
        let choices = body["choices"].as_array().unwrap();
        assert_eq!(choices.len(), prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(choices[i]["index"], i);
            assert_eq!(choices[i]["text"], expected_text(p, 3));
            let ids: Vec<u32> = (0..3).map(|k| MockWorker::token_at(p, k)).collect();
            assert_eq!(choices[i]["token_ids"], json!(ids));
        }
        let prompt_total: usize = prompts.iter().map(Vec::len).sum();
        assert_eq!(body["usage"]["prompt_tokens"], prompt_total);
        assert_eq!(body["usage"]["completion_tokens"], 3 * prompts.len());
    }
}

#[tokio::test]
async fn chat_stream_has_openai_chunks_usage_and_done() {
    let (s, _) = server(MockConfig::default()).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": true,
                      "stream_options": {"include_usage": true}});
    let events = post_sse(&s, "/v1/chat/completions", body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let ids: Vec<&Value> = chunks.iter().map(|c| &c["id"]).collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "one id for the whole stream"
    );
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
    }
    let (usage_chunk, content_chunks) = chunks.split_last().unwrap();
    assert!(content_chunks
        .iter()
        .all(|c| c["usage"].is_null() && c.get("usage").is_some()));
    assert_eq!(usage_chunk["choices"], json!([]));
    let prompt = chat_prompt("hi");
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 4);
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], prompt.len());
    let text: String = content_chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected_text(&prompt, 4));
    let finishes: Vec<&Value> = content_chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .collect();
    assert_eq!(finishes.last().unwrap().as_str(), Some("length"));
    assert!(finishes[..finishes.len() - 1].iter().all(|f| f.is_null()));

    // Without include_usage there is no usage anywhere.
    let body = json!({"prompt": [3, 4], "max_tokens": 2, "stream": true});
    let events = post_sse(&s, "/v1/completions", body).await;
    assert_eq!(events.len(), 3, "{events:?}");
    for e in &events[..2] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert!(c.get("usage").is_none());
        assert_eq!(c["object"], "text_completion");
    }
}

#[tokio::test]
async fn stop_token_ids_and_stop_strings_reach_the_worker() {
    let (s, worker) = server(MockConfig::default()).await;
    let prompt = vec![10u32, 20];
    let stop_id = MockWorker::token_at(&prompt, 2);
    let (status, body) = post(
        &s,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 10, "stop_token_ids": [stop_id], "stop": ["zz"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let seen = worker.requests.lock()[0].params.clone();
    assert_eq!(seen.stop, vec!["zz".to_string()]);
    assert_eq!(seen.stop_token_ids, vec![stop_id]);
}

#[tokio::test]
async fn nvext_ignore_eos_and_vllm_extras() {
    let (s, worker) = server(MockConfig {
        eos: Some((1, 2)),
        ..Default::default()
    })
    .await;
    let base = json!({"prompt": [1, 2], "max_tokens": 6});
    let (_, body) = post(&s, "/v1/completions", base.clone()).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"]["completion_tokens"], 2,
        "EOS at position 1 ends it"
    );

    let mut forced = base.clone();
    forced["nvext"] = json!({"ignore_eos": true});
    forced["min_tokens"] = json!(6);
    forced["top_k"] = json!(20);
    forced["min_p"] = json!(0.05);
    forced["repetition_penalty"] = json!(1.1);
    forced["seed"] = json!(7);
    let (status, body) = post(&s, "/v1/completions", forced).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 6);
    let p = worker.requests.lock()[1].params.clone();
    assert!(p.ignore_eos);
    assert_eq!((p.min_tokens, p.top_k, p.seed), (6, 20, Some(7)));
    assert!((p.min_p - 0.05).abs() < 1e-6 && (p.repetition_penalty - 1.1).abs() < 1e-6);
}

#[tokio::test]
async fn logprobs_in_both_apis() {
    let (s, _) = server(MockConfig::default()).await;
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": true, "top_logprobs": 3}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 2);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(content[0]["logprob"], -0.5);

    let (_, body) = post(
        &s,
        "/v1/completions",
        json!({"prompt": [1], "max_tokens": 3, "logprobs": 2}),
    )
    .await;
    let lp = &body["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);
}

#[tokio::test]
async fn models_health_and_metrics() {
    let (s, _) = server(MockConfig {
        blocks_per_request: 3,
        ..Default::default()
    })
    .await;
    let models: Value = reqwest::get(format!("{}/v1/models", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "mock");
    assert_eq!(
        reqwest::get(format!("{}/health", s.url))
            .await
            .unwrap()
            .status(),
        200
    );
    for _ in 0..3 {
        post(
            &s,
            "/v1/completions",
            json!({"prompt": [1], "max_tokens": 2}),
        )
        .await;
    }
    post_sse(
        &s,
        "/v1/completions",
        json!({"prompt": [1], "max_tokens": 2, "stream": true}),
    )
    .await;
    post(
        &s,
        "/v1/completions",
        json!({"prompt": [1], "model": "nope"}),
    )
    .await;
    let text = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // 3 whole + 1 stream + the models call above.
    assert!(
        text.contains("tandem_requests_total{status=\"200\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("tandem_requests_total{status=\"404\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("tandem_time_to_first_token_seconds_count 4"),
        "{text}"
    );
    assert!(
        text.contains("tandem_inter_token_latency_seconds_count 4"),
        "{text}"
    );
    assert!(
        text.contains("tandem_kv_blocks_active{worker=\"w0\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("tandem_queue_length{worker=\"w0\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("tandem_prefix_cache_hit_rate{worker=\"w0\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn streamed_choices_interleave_with_their_own_index() {
    let (s, _) = server(MockConfig::default()).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3, "stream": true,
                      "logprobs": true, "top_logprobs": 1, "stream_options": {"include_usage": true}});
    let events = post_sse(&s, "/v1/chat/completions", body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let prompt = chat_prompt("hi");
    for index in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .filter(|c| c["index"] == index)
            .collect();
        assert_eq!(mine[0]["delta"]["role"], "assistant");
        let text: String = mine
            .iter()
            .filter_map(|c| c["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, expected_text(&prompt, 3));
        let finishes: Vec<&Value> = mine
            .iter()
            .map(|c| &c["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finishes, [&json!("length")]);
        let lps = mine
            .iter()
            .filter(|c| c["logprobs"]["content"].is_array())
            .count();
        assert_eq!(lps, 3, "one logprobs entry per token");
    }
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 6);
    assert_eq!(
        usage["prompt_tokens"],
        prompt.len(),
        "a prompt shared by n choices counts once"
    );
}
