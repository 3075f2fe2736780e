//! `tandem generate` as a user runs it: the binary on the fixture checkpoints and a preset.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("generate")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("cannot run the tandem binary")
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "tandem generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn reference(name: &str) -> (String, Vec<u64>) {
    let text = std::fs::read_to_string(fixture_dir(name).join("reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompt: Vec<String> = ids(&r["prompt_tokens"])
        .iter()
        .map(u64::to_string)
        .collect();
    (prompt.join(","), ids(&r["greedy_tokens"]))
}

#[test]
fn generate_json_reproduces_transformers_greedy_tokens() {
    for (name, extra) in [
        ("llama-bf16", vec![]),
        ("llama-hf-saved", vec!["--block-size", "16"]),
        (
            "llama-fp8",
            vec!["--block-size", "7", "--max-num-batched-tokens", "16"],
        ),
    ] {
        let dir = fixture_dir(name);
        let (prompt, want) = reference(name);
        let mut args = vec![
            "--model",
            dir.to_str().unwrap(),
            "--prompt-tokens",
            &prompt,
            "--max-tokens",
            "20",
            "--temperature",
            "0",
            "--device",
            "cpu",
            "--json",
        ];
        args.extend(extra);
        let v = json_of(&tandem(&args));
        assert_eq!(ids(&v["tokens"]), want, "{name}");
        assert_eq!(ids(&v["prompt_tokens"]).len(), prompt.split(',').count());
        assert_eq!(v["finish_reason"], "length");
        assert!(v.get("text").is_none(), "no tokenizer, so no text");
        assert!(v["timing"]["prefill_ms"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn generate_stops_at_eos() {
    // The fp8 reference generates token 0 partway; make 0 the EOS id in a copy of the checkpoint.
    let src = fixture_dir("llama-fp8");
    let (prompt, want) = reference("llama-fp8");
    let stop = want
        .iter()
        .position(|&t| t == 0)
        .expect("reference generates token 0");
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let config = config.replace("\"eos_token_id\": 1", "\"eos_token_id\": 0");
    assert!(config.contains("\"eos_token_id\": 0"));
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--model",
            dir.path().to_str().unwrap(),
            "--prompt-tokens",
            &prompt,
            "--max-tokens",
            "20",
            "--json",
        ];
        args.extend(extra);
        json_of(&tandem(&args))
    };
    let v = run(&[]);
    assert_eq!(ids(&v["tokens"]), want[..=stop]);
    assert_eq!(v["finish_reason"], "stop");
    let v = run(&["--ignore-eos"]);
    assert_eq!(ids(&v["tokens"]), want);
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn generate_text_on_a_preset_with_dummy_weights() {
    let out = tandem(&[
        "--model",
        "tiny-llama",
        "--load-format",
        "dummy",
        "--prompt",
        "w1 w2 w3",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--block-size",
        "4",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(ids(&v["tokens"]).len(), 8);
    assert!(
        v["text"].is_string(),
        "a preset with a tokenizer gives text: {v}"
    );
    assert!(ids(&v["prompt_tokens"]).len() >= 3);
    // Seeded dummy weights and greedy decoding: the same tokens again.
    assert_eq!(
        json_of(&tandem(&[
            "--model",
            "tiny-llama",
            "--load-format",
            "dummy",
            "--prompt",
            "w1 w2 w3",
            "--max-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]))["tokens"],
        v["tokens"]
    );
}

#[test]
fn generate_rejects_bad_input_clearly() {
    let dir = fixture_dir("llama-bf16");
    let model = dir.to_str().unwrap();
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--model", model], "--prompt"),
        (
            vec!["--model", model, "--prompt", "hi", "--prompt-tokens", "1,2"],
            "cannot be used with",
        ),
        (vec!["--model", model, "--prompt", "hi"], "no tokenizer"),
        (
            vec![
                "--model",
                model,
                "--prompt-tokens",
                "5,6",
                "--max-tokens",
                "500",
            ],
            "maximum context length",
        ),
    ];
    for (args, message) in cases {
        let out = tandem(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains(message),
            "{args:?}: {err:?} should mention {message:?}"
        );
    }
}
