//! The engine over the mock backend: exact outputs, validation, cancellation, prefix caching,
//! sampling paths, stop conditions, failures.

mod engine_support;

use engine_support::*;
use futures::StreamExt;
use std::time::Duration;
use tandem::engine::mock_backend::MockBackend;
use tandem::engine::types::{EngineError, FinishReason, GenerateRequest, SamplingParams};
use tandem::engine::{Engine, EngineConfig, EngineHandle, TokenDecoder};
use tandem::worker::{LocalWorker, WorkerClient};

fn engine(block_size: usize, num_blocks: usize, config: EngineConfig) -> EngineHandle {
    Engine::start(
        Box::new(MockBackend::new(VOCAB, block_size, num_blocks)),
        None,
        config,
    )
}

#[tokio::test]
async fn greedy_matches_the_reference() {
    let e = engine(
        4,
        64,
        EngineConfig {
            max_num_batched_tokens: 8,
            ..Default::default()
        },
    );
    let prompt: Vec<u32> = (1..=13).collect();
    let out = run(&e, greedy("a", prompt.clone(), 9)).await;
    assert_eq!(
        out.tokens,
        MockBackend::reference_greedy(&prompt, 9, VOCAB, &[])
    );
    assert_eq!(out.finish, Some(FinishReason::Length));
    assert_eq!(out.usage.prompt_tokens, 13);
    assert_eq!(out.usage.completion_tokens, 9);
    assert_eq!(out.pieces, 9);
    assert_all_blocks_free(&e);
    assert!(
        e.metrics().steps >= 2 + 8,
        "a 13-token prompt under budget 8 takes two chunks"
    );
}

#[tokio::test]
async fn validation_errors_come_at_once() {
    let e = engine(
        4,
        8,
        EngineConfig {
            max_model_len: Some(40),
            max_queue_len: 2,
            ..Default::default()
        },
    );
    let err = |r: Result<_, EngineError>| r.err().expect("refused");
    assert!(matches!(
        err(e.generate(greedy("a", vec![], 4))),
        EngineError::InvalidRequest(_)
    ));
    match err(e.generate(greedy("a", vec![1; 30], 20))) {
        e @ EngineError::PromptTooLong {
            prompt_tokens: 30,
            max_tokens: 20,
            max_model_len: 40,
        } => {
            let msg = e.to_string();
            assert!(
                msg.contains("30") && msg.contains("20") && msg.contains("40"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    // 8 blocks of 4 tokens hold 32 positions; 30 + 5 - 1 needs 9 blocks.
    assert_eq!(
        err(e.generate(greedy("a", vec![1; 30], 5))),
        EngineError::NeverFits {
            needed: 9,
            total: 8
        }
    );
    assert!(matches!(
        err(e.generate(greedy("a", vec![VOCAB as u32], 1))),
        EngineError::InvalidRequest(_)
    ));
    let mut bad = greedy("a", vec![1], 1);
    bad.params.top_p = 0.0;
    assert!(matches!(
        err(e.generate(bad)),
        EngineError::InvalidRequest(_)
    ));
    let mut stop = greedy("a", vec![1], 1);
    stop.params.stop = vec!["x".into()];
    assert!(
        matches!(err(e.generate(stop)), EngineError::InvalidRequest(_)),
        "stop strings need a tokenizer"
    );
    e.shutdown();
}

#[tokio::test]
async fn queue_full_refuses_and_loses_nothing() {
    let backend = MockBackend::new(VOCAB, 4, 64).with_step_delay(Duration::from_millis(20));
    let cfg = EngineConfig {
        max_num_seqs: 1,
        max_queue_len: 2,
        ..Default::default()
    };
    let e = Engine::start(Box::new(backend), None, cfg);
    let first = e.generate(greedy("0", vec![1, 2], 30)).unwrap();
    // Wait until the first is running, then fill the queue.
    while e.metrics().running == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let queued: Vec<_> = (0..2)
        .map(|i| e.generate(greedy(&i.to_string(), vec![3, i], 3)).unwrap())
        .collect();
    assert_eq!(
        e.generate(greedy("x", vec![1], 1)).err(),
        Some(EngineError::QueueFull(2))
    );
    drop(first);
    for (i, s) in queued.into_iter().enumerate() {
        let out = collect(s).await.unwrap();
        assert_eq!(
            out.tokens,
            MockBackend::reference_greedy(&[3, i as u32], 3, VOCAB, &[])
        );
    }
    assert_all_blocks_free(&e);
}

#[tokio::test]
async fn dropping_the_stream_frees_blocks_at_once() {
    let backend = MockBackend::new(VOCAB, 4, 256).with_step_delay(Duration::from_millis(5));
    let e = Engine::start(Box::new(backend), None, EngineConfig::default());
    let mut s = e.generate(greedy("a", (0..40).collect(), 900)).unwrap();
    s.next().await.unwrap().unwrap();
    s.next().await.unwrap().unwrap(); // metrics are published after each step's outputs
    assert!(e.metrics().kv_blocks_active >= 10);
    drop(s);
    assert_all_blocks_free(&e);
    // The engine still serves.
    let out = run(&e, greedy("b", vec![7, 8], 2)).await;
    assert_eq!(
        out.tokens,
        MockBackend::reference_greedy(&[7, 8], 2, VOCAB, &[])
    );
}

#[tokio::test]
async fn prefix_cache_hits_and_same_output() {
    let e = engine(4, 64, EngineConfig::default());
    let prompt: Vec<u32> = (10..31).collect(); // 21 tokens: 5 full blocks
    let a = run(&e, greedy("a", prompt.clone(), 6)).await;
    assert_eq!(a.usage.cached_tokens, 0);
    let b = run(&e, greedy("b", prompt.clone(), 6)).await;
    assert_eq!(b.usage.cached_tokens, 20);
    assert_eq!(a.tokens, b.tokens);
    // A prompt sharing 2 blocks and then diverging.
    let mut other = prompt[..9].to_vec();
    other.extend([1, 2, 3]);
    let c = run(&e, greedy("c", other.clone(), 4)).await;
    assert_eq!(c.usage.cached_tokens, 8);
    assert_eq!(
        c.tokens,
        MockBackend::reference_greedy(&other, 4, VOCAB, &[])
    );
    // A prompt of exactly 2 full blocks: the last token is recomputed, so only 1 block hits.
    let d = run(&e, greedy("d", prompt[..8].to_vec(), 2)).await;
    assert_eq!(d.usage.cached_tokens, 4);
    let rate = e.metrics().prefix_hit_rate;
    let expect = (20 + 8 + 4) as f64 / (21 + 21 + 12 + 8) as f64;
    assert!((rate - expect).abs() < 1e-9, "{rate} vs {expect}");
    assert_all_blocks_free(&e);
}

#[tokio::test]
async fn prefix_caching_off_never_hits() {
    let e = engine(
        4,
        64,
        EngineConfig {
            enable_prefix_caching: false,
            ..Default::default()
        },
    );
    let prompt: Vec<u32> = (10..31).collect();
    let a = run(&e, greedy("a", prompt.clone(), 3)).await;
    let b = run(&e, greedy("b", prompt.clone(), 3)).await;
    assert_eq!((a.usage.cached_tokens, b.usage.cached_tokens), (0, 0));
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(e.metrics().prefix_hit_rate, 0.0);
}

fn sampled(id: &str, seed: u64, logits_path: bool) -> GenerateRequest {
    let params = SamplingParams {
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        seed: Some(seed),
        max_tokens: 12,
        ignore_eos: true,
        // min_p forces the host (logits) path, with the same distribution as min_p = 0+.
        min_p: if logits_path { 1e-9 } else { 0.0 },
        ..Default::default()
    };
    GenerateRequest {
        id: id.into(),
        prompt_tokens: vec![5, 6, 7],
        params,
    }
}

#[tokio::test]
async fn same_seed_same_output_whatever_the_batch() {
    let e = engine(4, 64, EngineConfig::default());
    let alone = run(&e, sampled("a", 42, false)).await;
    // Now the same request among others, started together.
    let mut streams = vec![];
    for i in 0..6 {
        streams.push(e.generate(sampled(&i.to_string(), 100 + i, false)).unwrap());
    }
    streams.push(e.generate(sampled("again", 42, false)).unwrap());
    let outs = futures::future::join_all(streams.into_iter().map(collect)).await;
    assert_eq!(outs.last().unwrap().as_ref().unwrap().tokens, alone.tokens);
    let distinct: std::collections::HashSet<_> = outs
        .iter()
        .map(|o| o.as_ref().unwrap().tokens.clone())
        .collect();
    assert!(distinct.len() > 3, "different seeds should mostly differ");
    // The host path samples the same way as the device path.
    let host = run(&e, sampled("h", 42, true)).await;
    assert_eq!(host.tokens, alone.tokens);
    assert_all_blocks_free(&e);
}

#[tokio::test]
async fn eos_stop_ids_min_tokens_and_logprobs() {
    eos_stops_min_tokens_and_logprobs(false).await;
}

/// The same with async scheduling: a stop token ends the stream although the step after it was
/// launched already; logits (logprobs, min_tokens) make the engine read a step before the next.
#[tokio::test]
async fn eos_stop_ids_min_tokens_and_logprobs_with_async_scheduling() {
    eos_stops_min_tokens_and_logprobs(true).await;
}

async fn eos_stops_min_tokens_and_logprobs(queued: bool) {
    let prompt = vec![1, 2, 3];
    let reference = MockBackend::reference_greedy(&prompt, 20, VOCAB, &[]);
    let eos = reference[4];
    let mut backend = MockBackend::new(VOCAB, 4, 64).with_eos(eos);
    if queued {
        backend = backend.with_queued_steps();
    }
    let taken = backend.previous_taken();
    let e = Engine::start(Box::new(backend), None, EngineConfig::default());
    let mut req = greedy("a", prompt.clone(), 20);
    req.params.ignore_eos = false;
    let out = run(&e, req.clone()).await;
    let first_eos = reference.iter().position(|&t| t == eos).unwrap();
    assert_eq!(out.tokens, reference[..=first_eos].to_vec());
    assert_eq!(out.finish, Some(FinishReason::Stop));

    let mut stop = req.clone();
    let stop_id = reference[2];
    stop.params.stop_token_ids = vec![stop_id];
    let out = run(&e, stop).await;
    let first_stop = reference
        .iter()
        .position(|&t| t == stop_id || t == eos)
        .unwrap();
    assert_eq!(out.tokens.len(), first_stop + 1);

    // min_tokens suppresses EOS (the tokens then leave the reference path).
    let mut min = req.clone();
    min.params.min_tokens = 10;
    min.params.logprobs = Some(3);
    let out = run(&e, min).await;
    assert!(out.tokens.len() >= 10);
    assert!(!out.tokens[..9].contains(&eos));
    assert_eq!(out.logprobs.len(), out.tokens.len());
    for (lp, &t) in out.logprobs.iter().zip(&out.tokens) {
        assert_eq!(lp.token_id, t);
        assert_eq!(lp.top.len(), 3);
        assert!(lp.top[0].1 >= lp.top[1].1 && lp.top[1].1 >= lp.top[2].1);
        assert!(lp.logprob <= 0.0);
    }
    assert_eq!(
        out.tokens[..4],
        reference[..4],
        "before EOS would be sampled the path is the same"
    );
    assert_all_blocks_free(&e);
    let taken = taken.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(queued, taken > 0, "{taken} tokens taken on the device");
}

#[tokio::test]
async fn text_deltas_and_stop_strings() {
    // A 128-token vocabulary: every token is an ASCII byte of the byte tokenizer (multi-byte
    // characters are covered by `multibyte_characters_come_out_whole`).
    let backend = MockBackend::new(128, 4, 64);
    let e = Engine::start_with_decoder(
        Box::new(backend),
        byte_tokenizer(&[]),
        EngineConfig::default(),
    );
    let prompt = bytes_of("hello world ");
    let reference = MockBackend::reference_greedy(&prompt, 24, 128, &[]);
    let out = run(&e, greedy("a", prompt.clone(), 24)).await;
    assert_eq!(out.tokens, reference);
    let full = ByteTokenizer { eos: vec![] }.decode(&reference).unwrap();
    assert_eq!(out.text, full, "deltas concatenate to the full decoding");
    assert_eq!(out.text.len(), 24);

    // Stop at a string taken from the middle of the output.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[4..6].iter().collect();
    let before: String = full[..full.find(&stop).unwrap()].to_string();
    let mut req = greedy("b", prompt, 24);
    req.params.stop = vec![stop.clone()];
    let out = run(&e, req).await;
    assert_eq!(out.text, before);
    assert_eq!(out.finish, Some(FinishReason::Stop));
    assert!(out.tokens.len() < 24);
    assert_all_blocks_free(&e);
}

#[tokio::test]
async fn multibyte_characters_come_out_whole() {
    // A fake backend is not needed: the detokenizer alone over a byte tokenizer.
    use tandem::engine::detokenize::IncrementalDetokenizer;
    let tok = ByteTokenizer { eos: vec![] };
    let prompt = bytes_of("a ");
    let gen = bytes_of("é€ x");
    let mut d = IncrementalDetokenizer::new(prompt.len());
    let mut all = prompt.clone();
    let mut deltas = vec![];
    for &t in &gen {
        all.push(t);
        deltas.push(d.next(&tok, &all, false).unwrap());
    }
    assert_eq!(deltas, vec!["", "é", "", "", "€", " ", "x"]);
}

#[tokio::test]
async fn backend_failure_fails_every_stream_and_refuses_new_requests() {
    // Slow steps: all four requests are in before the failure.
    let backend = MockBackend::new(VOCAB, 4, 64)
        .with_step_delay(Duration::from_millis(100))
        .failing_at_step(2);
    let e = Engine::start(Box::new(backend), None, EngineConfig::default());
    let streams: Vec<_> = (0..4)
        .map(|i| e.generate(greedy(&i.to_string(), vec![1, i], 50)).unwrap())
        .collect();
    for s in streams {
        match collect(s).await {
            Err(EngineError::Internal(msg)) => assert!(msg.contains("injected failure"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        e.generate(greedy("x", vec![1], 1)),
        Err(EngineError::Internal(_))
    ));
    assert_eq!(e.metrics().kv_blocks_active, 0);
}

#[tokio::test]
async fn a_panicking_backend_fails_streams_instead_of_hanging() {
    let backend = MockBackend::new(VOCAB, 4, 64)
        .with_step_delay(Duration::from_millis(50))
        .panicking_at_step(1);
    let e = Engine::start(Box::new(backend), None, EngineConfig::default());
    let a = e.generate(greedy("a", vec![1, 2], 20)).unwrap();
    let b = e.generate(greedy("b", vec![3], 20)).unwrap();
    for s in [a, b] {
        match collect(s).await {
            Err(EngineError::Internal(msg)) => assert!(msg.contains("injected panic"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
    match e.generate(greedy("c", vec![1], 1)) {
        Err(EngineError::Internal(msg)) => assert!(msg.contains("panicked"), "{msg}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(e.metrics().kv_blocks_active, 0);
}

#[tokio::test]
async fn shutdown_ends_live_streams_with_an_error() {
    let backend = MockBackend::new(VOCAB, 4, 256).with_step_delay(Duration::from_millis(5));
    let e = Engine::start(Box::new(backend), None, EngineConfig::default());
    let s = e.generate(greedy("a", vec![1], 900)).unwrap();
    e.shutdown();
    assert!(matches!(collect(s).await, Err(EngineError::Internal(_))));
    assert!(e.generate(greedy("b", vec![1], 1)).is_err());
}

#[tokio::test]
async fn local_worker_serves_through_the_client_trait() {
    let e = engine(4, 64, EngineConfig::default());
    let w: Box<dyn WorkerClient> = Box::new(LocalWorker::new("w0", e.clone()));
    assert_eq!(w.id(), "w0");
    let out = collect(w.generate(greedy("a", vec![4, 5], 3)).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        out.tokens,
        MockBackend::reference_greedy(&[4, 5], 3, VOCAB, &[])
    );
    assert_eq!(w.metrics().kv_blocks_total, 64);
    assert!(w.metrics().steps >= 3);
    assert!(w.generate(greedy("b", vec![], 3)).await.is_err());
}
