//! The sampler and text helpers against hand-computed expectations.

use tandem::backend::{DeviceSampling, Emit};
use tandem::engine::detokenize::StopText;
use tandem::engine::sampler::{apply_penalties, log_softmax, sample, top_n, SeqSampler};
use tandem::engine::types::SamplingParams;

fn params() -> SamplingParams {
    SamplingParams::default()
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let mut logits = vec![2.0, -1.0, 3.0, 0.5];
    let p = SamplingParams {
        repetition_penalty: 2.0,
        ..params()
    };
    // Token 0 in the prompt, 1 generated twice (penalized once), 3 untouched.
    apply_penalties(&mut logits, &[0], &[1, 1], &p);
    assert_eq!(logits, vec![1.0, -2.0, 3.0, 0.5]);
}

#[test]
fn frequency_and_presence_penalties_count_generated_tokens_only() {
    let mut logits = vec![1.0, 1.0, 1.0];
    let p = SamplingParams {
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..params()
    };
    apply_penalties(&mut logits, &[2, 2, 2], &[0, 0, 0, 1], &p);
    // 0: 1 - 3*0.5 - 0.25 = -0.75; 1: 1 - 0.5 - 0.25 = 0.25; 2 (prompt only): 1.
    assert_eq!(logits, vec![-0.75, 0.25, 1.0]);
}

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    assert_eq!(sample(&[0.1, 0.7, 0.7, 0.2], 0.0, 0, 1.0, 0.0, 0.99), 1);
}

#[test]
fn top_k_top_p_and_min_p_cut_candidates() {
    // ln of probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1.
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    // No filter: u = 0.9 falls in [0.8, 0.95): token 2.
    assert_eq!(sample(&logits, 1.0, 0, 1.0, 0.0, 0.9), 2);
    // top_k 2: mass 0.8 renormalized to 0.625/0.375; u = 0.9 -> token 1.
    assert_eq!(sample(&logits, 1.0, 2, 1.0, 0.0, 0.9), 1);
    assert_eq!(sample(&logits, 1.0, 2, 1.0, 0.0, 0.6), 0);
    // top_p 0.7: 0.5 < 0.7, 0.8 >= 0.7 -> tokens 0 and 1 as above.
    assert_eq!(sample(&logits, 1.0, 0, 0.7, 0.0, 0.9), 1);
    // top_p 0.5: token 0 alone.
    assert_eq!(sample(&logits, 1.0, 0, 0.5, 0.0, 0.99), 0);
    // min_p 0.35: keep p >= 0.175 -> tokens 0, 1 (0.625/0.375).
    assert_eq!(sample(&logits, 1.0, 0, 1.0, 0.35, 0.9), 1);
    assert_eq!(sample(&logits, 1.0, 0, 1.0, 0.35, 0.6), 0);
    // min_p 0.25: keep p >= 0.125 -> tokens 0, 1, 2 (mass 0.95); u = 0.9 -> 0.855: token 2.
    assert_eq!(sample(&logits, 1.0, 0, 1.0, 0.25, 0.9), 2);
    // min_p applies after temperature: at T = 2, p ~ sqrt -> 0.05 vs 0.5 ratio is 0.316.
    assert_eq!(sample(&logits, 2.0, 0, 1.0, 0.3, 0.9999), 3);
    assert_eq!(sample(&logits, 2.0, 0, 1.0, 0.33, 0.9999), 2);
}

#[test]
fn logprobs_and_top_n() {
    let lp = log_softmax(&[0.0, (3.0f32).ln()]);
    assert!((lp[0] - 0.25f32.ln()).abs() < 1e-6);
    assert!((lp[1] - 0.75f32.ln()).abs() < 1e-6);
    assert_eq!(
        top_n(&[-1.0, -0.5, -0.5, -3.0], 3),
        vec![(1, -0.5), (2, -0.5), (0, -1.0)]
    );
}

#[test]
fn device_path_only_for_plain_temperature_top_k_top_p() {
    let plain = SamplingParams {
        temperature: 0.7,
        top_k: 5,
        top_p: 0.9,
        seed: Some(1),
        ..params()
    };
    let mut s = SeqSampler::new(&plain, &[9]);
    match s.next_emit(0) {
        Emit::Sample(DeviceSampling {
            temperature,
            top_k,
            top_p,
            uniform,
        }) => {
            assert_eq!((temperature, top_k, top_p), (0.7, 5, 0.9));
            assert!((0.0..1.0).contains(&uniform));
        }
        other => panic!("{other:?}"),
    }
    for p in [
        SamplingParams {
            min_p: 0.1,
            ..plain.clone()
        },
        SamplingParams {
            presence_penalty: 0.1,
            ..plain.clone()
        },
        SamplingParams {
            frequency_penalty: 0.1,
            ..plain.clone()
        },
        SamplingParams {
            repetition_penalty: 1.1,
            ..plain.clone()
        },
        SamplingParams {
            logprobs: Some(0),
            ..plain.clone()
        },
        SamplingParams {
            min_tokens: 3,
            ..plain.clone()
        },
    ] {
        assert_eq!(
            SeqSampler::new(&p, &[9]).next_emit(0),
            Emit::Logits,
            "{p:?}"
        );
    }
    // min_tokens reached: back to the device path.
    let p = SamplingParams {
        min_tokens: 3,
        ..plain
    };
    assert!(matches!(
        SeqSampler::new(&p, &[9]).next_emit(3),
        Emit::Sample(_)
    ));
}

#[test]
fn seeded_draws_repeat_and_min_tokens_suppresses_stops() {
    let p = SamplingParams {
        temperature: 1.0,
        seed: Some(5),
        ..params()
    };
    let draws = |p: &SamplingParams| {
        let mut s = SeqSampler::new(p, &[]);
        (0..5)
            .map(|_| match s.next_emit(0) {
                Emit::Sample(d) => d.uniform,
                _ => unreachable!(),
            })
            .collect::<Vec<f32>>()
    };
    assert_eq!(draws(&p), draws(&p));
    assert_ne!(
        draws(&p),
        draws(&SamplingParams {
            seed: Some(6),
            ..p.clone()
        })
    );

    // EOS 1 and stop id 2 would win; below min_tokens they cannot be sampled.
    let p = SamplingParams {
        min_tokens: 2,
        stop_token_ids: vec![2],
        ..params()
    };
    let mut s = SeqSampler::new(&p, &[1]);
    assert_eq!(s.next_emit(0), Emit::Logits);
    let (t, _) = s.sample_logits(vec![0.0, 5.0, 4.0, 1.0], &[0], &[]);
    assert_eq!(t, 3);
    assert!(s.is_stop_token(1) && s.is_stop_token(2) && !s.is_stop_token(3));
    let (t, _) = s.sample_logits(vec![0.0, 5.0, 4.0, 1.0], &[0], &[3, 3]);
    assert_eq!(t, 1);
    // ignore_eos: EOS is an ordinary token.
    let s = SeqSampler::new(
        &SamplingParams {
            ignore_eos: true,
            ..params()
        },
        &[1],
    );
    assert!(!s.is_stop_token(1));
}

#[test]
fn stop_strings_are_trimmed_and_partial_matches_held_back() {
    let mut st = StopText::new(vec!["END".into(), "\n\n".into()]);
    // The longest stop is 3 bytes: the last 2 are held back until they cannot start one.
    assert_eq!(st.push("hello E", true), ("hello".to_string(), false));
    assert_eq!(st.push("N", true), (" ".to_string(), false));
    assert_eq!(st.push("Xtra", true), ("ENXt".to_string(), false));
    assert_eq!(st.push("a EN", true), ("raa ".to_string(), false));
    assert_eq!(st.push("D more", true), ("".to_string(), true));
    assert_eq!(st.flush(), "");

    let mut st = StopText::new(vec!["\n\n".into()]);
    assert_eq!(st.push("a\n", true), ("a".to_string(), false));
    assert_eq!(st.push("b", true), ("\n".to_string(), false));
    assert_eq!(st.flush(), "b");
    // Not checked before min_tokens; multi-byte text is cut on character boundaries.
    let mut st = StopText::new(vec!["é!".into()]);
    assert_eq!(st.push("é!x", false), ("é!x".to_string(), false));
    assert_eq!(st.push("ßé", true), ("ß".to_string(), false));
    assert_eq!(st.push("!", true), ("".to_string(), true));
    assert_eq!(st.flush(), "");
}
