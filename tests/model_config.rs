//! config.json parsing and its error messages; resolving model names to directories.

use serde_json::json;
use tandem::model::{LlamaConfig, ModelFiles};

fn base() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": [2, 3],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    })
}

fn parse_err(v: &serde_json::Value) -> String {
    format!(
        "{:#}",
        LlamaConfig::from_json(v).expect_err("config should be rejected")
    )
}

#[test]
fn parses_llama3_config() {
    let c = LlamaConfig::from_json(&base()).unwrap();
    assert_eq!(c.head_dim, 16);
    assert_eq!(c.q_size(), 64);
    assert_eq!(c.kv_size(), 32);
    assert_eq!(c.eos_token_ids, vec![2, 3]);
    assert_eq!(c.bos_token_id, Some(1));
    assert!(!c.tie_word_embeddings);
    let s = c.rope_scaling.as_ref().unwrap();
    assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 64));
    assert_eq!(c.torch_dtype.dtype(), candle_core::DType::BF16);
    // Highest frequency is untouched; the lowest (wavelength > 64 positions) is divided by 8.
    let inv = c.rope_inv_freq();
    assert_eq!(inv.len(), 8);
    assert_eq!(inv[0], 1.0);
    let unscaled_last = 1.0 / 500000f64.powf(14.0 / 16.0);
    assert!((inv[7] - unscaled_last / 8.0).abs() < 1e-15);
    assert!(c.quantization.is_none());
    assert!(!c.is_fp8_linear("model.layers.0.mlp.up_proj"));
}

#[test]
fn malformed_json_is_reported() {
    let err = format!(
        "{:#}",
        LlamaConfig::from_json_str("{\"hidden_size\": ").unwrap_err()
    );
    assert!(err.contains("not valid JSON"), "{err}");
}

#[test]
fn missing_and_bad_fields_are_named() {
    let mut v = base();
    v.as_object_mut().unwrap().remove("intermediate_size");
    assert!(parse_err(&v).contains("missing field `intermediate_size`"));

    let mut v = base();
    v["num_key_value_heads"] = json!(3);
    assert!(parse_err(&v).contains("`num_key_value_heads`"));

    let mut v = base();
    v["hidden_size"] = json!("big");
    assert!(parse_err(&v).contains("`hidden_size` must be a positive integer"));

    let mut v = base();
    v["architectures"] = json!(["MistralForCausalLM"]);
    assert!(parse_err(&v).contains("`architectures`"));

    let mut v = base();
    v["torch_dtype"] = json!("float8");
    assert!(parse_err(&v).contains("`torch_dtype`"));

    let mut v = base();
    v["hidden_act"] = json!("gelu");
    assert!(parse_err(&v).contains("`hidden_act`"));
}

#[test]
fn unsupported_rope_type_is_named() {
    let mut v = base();
    v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    let err = parse_err(&v);
    assert!(
        err.contains("rope_scaling.rope_type") && err.contains("yarn"),
        "{err}"
    );
    v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
    assert!(parse_err(&v).contains("rope_scaling.low_freq_factor"));
}

fn with_quant(weights_strategy: &str, dynamic: bool) -> serde_json::Value {
    let mut v = base();
    v["quantization_config"] = json!({
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": weights_strategy, "dynamic": false},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": dynamic}}},
        "ignore": ["lm_head", "re:.*layers.1.mlp.down_proj"],
    });
    v
}

#[test]
fn fp8_quantization_and_ignore_list() {
    let c = LlamaConfig::from_json(&with_quant("channel", true)).unwrap();
    assert!(c.is_fp8_linear("model.layers.0.self_attn.q_proj"));
    assert!(!c.is_fp8_linear("lm_head"));
    assert!(!c.is_fp8_linear("model.layers.1.mlp.down_proj"));
    assert!(c.is_fp8_linear("model.layers.0.mlp.down_proj"));
}

#[test]
fn bad_quantization_schemes_are_named() {
    let err = parse_err(&with_quant("tensor", true));
    assert!(
        err.contains("config_groups.group_0.weights.strategy"),
        "{err}"
    );
    let err = parse_err(&with_quant("channel", false));
    assert!(err.contains("input_activations.dynamic"), "{err}");
    let mut v = with_quant("channel", true);
    v["quantization_config"]["kv_cache_scheme"] = json!({"num_bits": 8, "type": "float"});
    assert!(parse_err(&v).contains("quantization_config.kv_cache_scheme"));
    v["quantization_config"]["kv_cache_scheme"] = json!(null);
    v["quantization_config"]["config_groups"]["group_0"]["targets"] = json!(["re:.*q_proj"]);
    assert!(parse_err(&v).contains("config_groups.group_0.targets"));
    v["quantization_config"]["config_groups"]["group_0"]["targets"] = json!(["Linear"]);
    assert!(LlamaConfig::from_json(&v).is_ok());
    v["quantization_config"]["quant_method"] = json!("gptq");
    assert!(parse_err(&v).contains("quantization_config.quant_method"));
    v["quantization_config"]["quant_method"] = json!("compressed-tensors");
    v["quantization_config"]["format"] = json!("pack-quantized");
    assert!(parse_err(&v).contains("quantization_config.format"));
}

#[test]
fn resolves_dirs_presets_and_hub_ids() {
    // A preset found through TANDEM_MODELS_DIR.
    let root = tempfile::tempdir().unwrap();
    let preset = root.path().join("my-model");
    std::fs::create_dir(&preset).unwrap();
    std::fs::write(preset.join("config.json"), base().to_string()).unwrap();
    std::env::set_var("TANDEM_MODELS_DIR", root.path());
    let files = ModelFiles::resolve("my-model").unwrap();
    assert_eq!(files.dir, preset);
    assert!(files.tokenizer.is_none());
    std::env::remove_var("TANDEM_MODELS_DIR");

    // A directory without config.json.
    let empty = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        ModelFiles::resolve(empty.path().to_str().unwrap()).unwrap_err()
    );
    assert!(err.contains("no config.json"), "{err}");

    // Neither a directory, a preset nor a hub id.
    let err = format!("{:#}", ModelFiles::resolve("./no/such/dir").unwrap_err());
    assert!(err.contains("not a directory, not a preset"), "{err}");

    // A hub id, offline: fails at once with a hint to pass a local directory.
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", cache.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = format!(
        "{:#}",
        ModelFiles::resolve("some-org/some-model").unwrap_err()
    );
    assert!(
        err.contains("pass its local directory") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    // Online but unreachable (nothing listens on port 1): fails quickly, same hint.
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:1");
    let start = std::time::Instant::now();
    let err = format!(
        "{:#}",
        ModelFiles::resolve("some-org/some-model").unwrap_err()
    );
    assert!(err.contains("pass its local directory"), "{err}");
    assert!(start.elapsed().as_secs() < 30);
}
