//! The disaggregation hooks on the mock backend: prefill on one engine, decode on another with
//! explicit block ids, and every failure path back to a local prefill, with no block leaked.

mod engine_support;

use engine_support::*;
use std::time::Duration;
use tandem::engine::mock_backend::MockBackend;
use tandem::engine::types::{EngineError, GenerateRequest, SamplingParams};
use tandem::engine::{Engine, EngineConfig, EngineHandle};

fn engine(config: EngineConfig) -> EngineHandle {
    Engine::start(Box::new(MockBackend::new(VOCAB, 4, 64)), None, config)
}

fn seeded(id: &str, prompt: Vec<u32>) -> GenerateRequest {
    let params = SamplingParams {
        temperature: 0.8,
        seed: Some(7),
        max_tokens: 10,
        ignore_eos: true,
        ..Default::default()
    };
    GenerateRequest {
        id: id.into(),
        prompt_tokens: prompt,
        params,
    }
}

/// Runs `req` split between `prefill` and `decode`, as the runtime would.
async fn disaggregated(
    prefill: &EngineHandle,
    decode: &EngineHandle,
    req: GenerateRequest,
) -> Collected {
    let (ticket, stream) = decode.generate_remote_prefill(req.clone()).await.unwrap();
    assert_eq!(ticket.block_ids.len(), req.prompt_tokens.len().div_ceil(4));
    let export = prefill.prefill_and_export(req.clone()).await.unwrap();
    assert_eq!(export.num_blocks, ticket.block_ids.len());
    assert_eq!(export.layout, ticket.layout);
    let data = export.blocks_from(ticket.num_cached_blocks).to_vec();
    decode
        .import_kv(&ticket.request_id, ticket.blocks_to_write().to_vec(), data)
        .await
        .unwrap();
    decode
        .complete_remote_prefill(&ticket.request_id, export.first_token)
        .await
        .unwrap();
    collect(stream).await.unwrap()
}

#[tokio::test]
async fn disaggregated_equals_aggregated() {
    let (agg, prefill, decode) = (
        engine(Default::default()),
        engine(Default::default()),
        engine(Default::default()),
    );
    for (i, len) in [1usize, 4, 5, 13, 30].into_iter().enumerate() {
        let prompt: Vec<u32> = (0..len as u32).map(|t| t * 7 + i as u32).collect();
        let want = run(&agg, greedy("g", prompt.clone(), 8)).await;
        let got = disaggregated(
            &prefill,
            &decode,
            greedy(&format!("g{i}"), prompt.clone(), 8),
        )
        .await;
        assert_eq!(got.tokens, want.tokens, "greedy, prompt of {len}");
        // A seeded sampled request too: the decode side skips the prefill side's draw.
        let want = run(&agg, seeded("s", prompt.clone())).await;
        let got = disaggregated(&prefill, &decode, seeded(&format!("s{i}"), prompt)).await;
        assert_eq!(got.tokens, want.tokens, "seeded, prompt of {len}");
        assert_eq!(got.usage.prompt_tokens, len);
    }
    for e in [&agg, &prefill, &decode] {
        assert_all_blocks_free(e);
    }
}

/// Prefill and decode engines that schedule asynchronously (queued mock steps), with KV imports
/// arriving while the decode engine runs other requests: the same tokens as an aggregated engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_with_async_scheduling_equals_aggregated() {
    let queued = || {
        let backend = MockBackend::new(VOCAB, 4, 64)
            .with_queued_steps()
            .with_step_delay(Duration::from_millis(2));
        let taken = backend.previous_taken();
        (
            Engine::start(Box::new(backend), None, Default::default()),
            taken,
        )
    };
    let agg = engine(Default::default());
    let ((prefill, _), (decode, taken)) = (queued(), queued());
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| (0..5 + 3 * i).map(|t| t * 11 + i).collect())
        .collect();
    let mut tasks = vec![];
    for (i, prompt) in prompts.iter().enumerate() {
        let (p, d, prompt) = (prefill.clone(), decode.clone(), prompt.clone());
        tasks.push(tokio::spawn(async move {
            disaggregated(&p, &d, seeded(&format!("q{i}"), prompt)).await
        }));
    }
    for (task, prompt) in tasks.into_iter().zip(prompts) {
        let got = task.await.unwrap();
        let want = run(&agg, seeded("a", prompt)).await;
        assert_eq!(got.tokens, want.tokens);
    }
    assert!(taken.load(std::sync::atomic::Ordering::Relaxed) > 0);
    for e in [&agg, &prefill, &decode] {
        assert_all_blocks_free(e);
    }
}

#[tokio::test]
async fn decode_side_prefix_hits_are_not_rewritten() {
    let (prefill, decode) = (engine(Default::default()), engine(Default::default()));
    let prompt: Vec<u32> = (100..118).collect(); // 18 tokens: 4 full blocks + 2
    run(&decode, greedy("warm", prompt.clone(), 1)).await;
    let (ticket, stream) = decode
        .generate_remote_prefill(greedy("r", prompt.clone(), 5))
        .await
        .unwrap();
    assert_eq!(ticket.num_cached_blocks, 4);
    // Writing into a cached block is refused.
    let bytes = vec![0u8; ticket.layout.block_bytes()];
    let err = decode
        .import_kv("r", vec![ticket.block_ids[0]], bytes)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidRequest(_)), "{err:?}");
    let export = prefill
        .prefill_and_export(greedy("r", prompt.clone(), 5))
        .await
        .unwrap();
    let data = export.blocks_from(ticket.num_cached_blocks).to_vec();
    decode
        .import_kv("r", ticket.blocks_to_write().to_vec(), data)
        .await
        .unwrap();
    decode
        .complete_remote_prefill("r", export.first_token)
        .await
        .unwrap();
    let out = collect(stream).await.unwrap();
    assert_eq!(
        out.tokens,
        MockBackend::reference_greedy(&prompt, 5, VOCAB, &[])
    );
    assert_eq!(out.usage.cached_tokens, 16);
    assert_all_blocks_free(&decode);
    assert_all_blocks_free(&prefill);
}

#[tokio::test]
async fn bad_imports_are_refused() {
    let decode = engine(Default::default());
    let prompt: Vec<u32> = (1..10).collect();
    let (ticket, _stream) = decode
        .generate_remote_prefill(greedy("r", prompt.clone(), 3))
        .await
        .unwrap();
    let bb = ticket.layout.block_bytes();
    let other_block = (0..64).find(|b| !ticket.block_ids.contains(b)).unwrap();
    let e = decode
        .import_kv("r", vec![other_block], vec![0; bb])
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::InvalidRequest(_)));
    let e = decode
        .import_kv("r", vec![ticket.block_ids[0]], vec![0; bb - 1])
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::InvalidRequest(_)));
    let e = decode
        .import_kv("nope", vec![ticket.block_ids[0]], vec![0; bb])
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::InvalidRequest(_)));
    let e = decode.complete_remote_prefill("nope", 1).await.unwrap_err();
    assert!(matches!(e, EngineError::InvalidRequest(_)));
    // A duplicate id while the first is parked.
    let dup = decode.generate_remote_prefill(greedy("r", prompt, 3)).await;
    assert!(matches!(dup, Err(EngineError::InvalidRequest(_))));
}

#[tokio::test]
async fn failed_remote_prefill_falls_back_to_local() {
    let decode = engine(Default::default());
    let prompt: Vec<u32> = (1..20).collect();
    let (ticket, stream) = decode
        .generate_remote_prefill(greedy("r", prompt.clone(), 6))
        .await
        .unwrap();
    assert!(decode.metrics().kv_blocks_active >= ticket.block_ids.len());
    decode.fail_remote_prefill("r").await.unwrap();
    let out = collect(stream).await.unwrap();
    assert_eq!(
        out.tokens,
        MockBackend::reference_greedy(&prompt, 6, VOCAB, &[])
    );
    // The late transfer of a request no longer parked is refused.
    let late = decode
        .import_kv(
            "r",
            ticket.block_ids.clone(),
            vec![0; 5 * ticket.layout.block_bytes()],
        )
        .await;
    assert!(late.is_err());
    assert_all_blocks_free(&decode);
}

#[tokio::test]
async fn parked_requests_time_out_into_a_local_prefill() {
    let config = EngineConfig {
        remote_prefill_timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let decode = engine(config);
    let prompt: Vec<u32> = (1..9).collect();
    let started = std::time::Instant::now();
    let (_ticket, stream) = decode
        .generate_remote_prefill(greedy("r", prompt.clone(), 4))
        .await
        .unwrap();
    let out = collect(stream).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(
        out.tokens,
        MockBackend::reference_greedy(&prompt, 4, VOCAB, &[])
    );
    assert_all_blocks_free(&decode);
}

#[tokio::test]
async fn dropping_a_parked_stream_or_an_export_frees_blocks() {
    let backend = MockBackend::new(VOCAB, 4, 64).with_step_delay(Duration::from_millis(20));
    let config = EngineConfig {
        max_num_batched_tokens: 16,
        ..Default::default()
    };
    let e = Engine::start(Box::new(backend), None, config);
    let (_t, stream) = e
        .generate_remote_prefill(greedy("r", (1..30).collect(), 4))
        .await
        .unwrap();
    assert_eq!(e.metrics().kv_blocks_active, 8);
    assert_eq!(e.metrics().waiting, 1, "parked requests count as waiting");
    drop(stream);
    assert_all_blocks_free(&e);
    // An export abandoned by its caller (e.g. a timeout) is cancelled.
    let fut = e.prefill_and_export(greedy("p", (1..200).collect(), 1));
    let r = tokio::time::timeout(Duration::from_millis(30), fut).await;
    assert!(r.is_err(), "the prefill should still be running");
    assert_all_blocks_free(&e);
}

#[tokio::test]
async fn exports_share_steps_under_the_budget() {
    let backend = MockBackend::new(VOCAB, 4, 64);
    let log = backend.log();
    let config = EngineConfig {
        max_num_batched_tokens: 32,
        ..Default::default()
    };
    let e = Engine::start(Box::new(backend), None, config);
    let futs: Vec<_> = (0..4u32)
        .map(|i| e.prefill_and_export(greedy(&i.to_string(), vec![i + 1; 8], 1)))
        .collect();
    let exports = futures::future::join_all(futs).await;
    for (i, x) in exports.into_iter().enumerate() {
        let x = x.unwrap();
        assert_eq!(
            x.first_token,
            MockBackend::reference_greedy(&[i as u32 + 1; 8], 1, VOCAB, &[])[0]
        );
        assert_eq!(x.kv.len(), 2 * x.layout.block_bytes());
    }
    let log = log.lock();
    assert!(
        log.iter().any(|step| step.len() == 4),
        "four 8-token prompts fit one 32-token step"
    );
    assert_all_blocks_free(&e);
}
