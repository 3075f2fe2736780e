//! The committed presets: configs parse, tokenizers load, dummy weights have the right shapes.

use candle_core::DType;
use tandem::model::{load_weights, tensor_specs, ChatMessage, Linear, LoadFormat, ModelFiles};

#[test]
fn tiny_preset_resolves_with_tokenizer() {
    let files = ModelFiles::resolve("tiny-llama").unwrap();
    let c = &files.config;
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.head_dim),
        (64, 2, 16)
    );
    let tok = files
        .tokenizer
        .as_ref()
        .expect("tiny-llama has a tokenizer");
    assert_eq!(tok.vocab_size(), c.vocab_size);
    assert_eq!(tok.encode("w1 w2 w3", false).unwrap(), vec![1, 2, 3]);
    assert_eq!(tok.encode("w1 w2 w3", true).unwrap(), vec![512, 1, 2, 3]);
    assert_eq!(tok.decode(&[1, 2, 3], false).unwrap(), "w1 w2 w3");
    assert_eq!(tok.decode(&[512, 7, 516], true).unwrap(), "w7");
    assert_eq!(tok.eos_token_ids(), vec![513, 516]);
    assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
    let prompt = tok
        .apply_chat_template(&[ChatMessage::new("user", " w5 w6 ")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nw5 w6<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    // Special tokens in the rendered prompt encode to their ids; unknown words map to w0.
    let ids = tok.encode(&prompt, false).unwrap();
    assert_eq!(ids, vec![512, 514, 0, 515, 5, 6, 516, 514, 0, 515]);
}

#[test]
fn big_preset_tokenizer_has_llama3_layout() {
    let files = ModelFiles::resolve("llama-3.3-70b-fp8-dynamic").unwrap();
    let tok = files.tokenizer.as_ref().unwrap();
    assert_eq!(tok.vocab_size(), 128_256);
    assert_eq!(files.config.vocab_size, 128_256);
    for (id, name) in [
        (128000, "<|begin_of_text|>"),
        (128001, "<|end_of_text|>"),
        (128006, "<|start_header_id|>"),
        (128007, "<|end_header_id|>"),
        (128009, "<|eot_id|>"),
        (128255, "<|reserved_special_token_247|>"),
    ] {
        assert_eq!(tok.id_to_token(id).as_deref(), Some(name), "id {id}");
    }
    assert_eq!(
        tok.encode("w127999 w17 w4", false).unwrap(),
        vec![127999, 17, 4]
    );
    assert_eq!(tok.decode(&[1, 2, 3], false).unwrap(), "w1 w2 w3");
}

#[test]
fn tiny_dummy_weights_match_specs() {
    let files = ModelFiles::resolve("tiny-llama").unwrap();
    let w = load_weights(&files, LoadFormat::Dummy, 7).unwrap();
    assert_eq!(w.layers.len(), 2);
    assert_eq!(w.embed_tokens.dims(), &[520, 64]);
    assert_eq!(w.embed_tokens.dtype(), DType::BF16);
    assert_eq!(w.layers[0].k_proj.dims(), (32, 64));
    assert_eq!(w.layers[1].down_proj.dims(), (64, 128));
    assert!(matches!(w.lm_head, Linear::Dense { .. }));
    let again = load_weights(&files, LoadFormat::Dummy, 7).unwrap();
    let other = load_weights(&files, LoadFormat::Dummy, 8).unwrap();
    let v = |t: &candle_core::Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(v(&w.embed_tokens), v(&again.embed_tokens));
    assert_ne!(v(&w.embed_tokens), v(&other.embed_tokens));
}

#[test]
fn big_preset_specs_have_fp8_shapes() {
    let files = ModelFiles::resolve("llama-3.3-70b-fp8-dynamic").unwrap();
    let specs = tensor_specs(&files.config);
    // embed + final norm + lm_head + 80 × (2 norms + 7 FP8 linears × 2 tensors)
    assert_eq!(specs.len(), 3 + 80 * 16);
    let find = |n: &str| specs.iter().find(|s| s.name == n).unwrap();
    let q = find("model.layers.79.self_attn.q_proj.weight");
    assert_eq!(
        (q.shape.clone(), q.dtype),
        (vec![8192, 8192], DType::F8E4M3)
    );
    let k = find("model.layers.0.self_attn.k_proj.weight_scale");
    assert_eq!((k.shape.clone(), k.dtype), (vec![1024, 1], DType::F32));
    let down = find("model.layers.3.mlp.down_proj.weight");
    assert_eq!(down.shape, vec![8192, 28672]);
    let head = find("lm_head.weight");
    assert_eq!(
        (head.shape.clone(), head.dtype),
        (vec![128256, 8192], DType::BF16)
    );
    let params: usize = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    assert!(
        (70_000_000_000..71_000_000_000).contains(&params),
        "{params}"
    );
}

fn f32s(t: &candle_core::Tensor) -> Vec<f32> {
    let t = t.to_dtype(DType::F32).unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn mean_std(v: &[f32]) -> (f32, f32) {
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
    (mean, var.sqrt())
}

#[test]
fn fp8_dummy_weights_are_valid_and_scaled() {
    let files = ModelFiles::resolve("tiny-llama-fp8").unwrap();
    let specs = tensor_specs(&files.config);
    // embed + final norm + lm_head + 2 × (2 norms + 7 FP8 linears × 2 tensors)
    assert_eq!(specs.len(), 3 + 2 * 16);
    let w = load_weights(&files, LoadFormat::Dummy, 3).unwrap();
    let layers = files.config.num_hidden_layers as f32;
    for layer in &w.layers {
        let linears = [
            (&layer.q_proj, 1.0),
            (&layer.k_proj, 1.0),
            (&layer.o_proj, (2.0 * layers).sqrt()),
            (&layer.gate_proj, 1.0),
            (&layer.down_proj, (2.0 * layers).sqrt()),
        ];
        for (linear, damping) in linears {
            let Linear::Fp8 { weight, scale } = linear else {
                panic!("FP8 preset has FP8 linears")
            };
            let (out, inp) = linear.dims();
            assert_eq!(weight.dtype(), DType::F8E4M3);
            assert_eq!((scale.dtype(), scale.dims()), (DType::F32, &[out, 1][..]));
            let codes = f32s(weight);
            assert!(codes.iter().all(|c| c.is_finite() && c.abs() <= 448.0));
            let scales = f32s(scale);
            assert!(scales.iter().all(|s| *s > 0.0));
            // Effective weights code · scale have std ≈ 1/sqrt(in) (÷ damping into the residual).
            let effective: Vec<f32> = codes
                .iter()
                .enumerate()
                .map(|(k, c)| c * scales[k / inp])
                .collect();
            let (mean, std) = mean_std(&effective);
            let want = 1.0 / (inp as f32).sqrt() / damping;
            assert!(mean.abs() < 0.1 * want, "mean {mean}");
            assert!((std / want - 1.0).abs() < 0.15, "std {std}, want {want}");
        }
        let (mean, std) = mean_std(&f32s(&layer.input_layernorm));
        assert!(
            (mean - 1.0).abs() < 0.02 && std < 0.05,
            "norm {mean} ± {std}"
        );
    }
    let Linear::Dense { weight } = &w.lm_head else {
        panic!("lm_head is ignored by the FP8 scheme")
    };
    assert_eq!(weight.dtype(), DType::BF16);
}

#[test]
fn model_types_can_be_shared_across_threads() {
    fn shared<T: Send + Sync + Clone>() {}
    shared::<tandem::model::Tokenizer>();
    shared::<ModelFiles>();
    shared::<tandem::model::LlamaWeights>();
}

#[test]
fn dummy_weights_larger_than_host_memory_are_refused() {
    let files = ModelFiles::resolve("llama-3.3-70b-fp8-dynamic").unwrap();
    let mut config = files.config.clone();
    config.num_hidden_layers = 10_000; // ~9 TB
    let err = tandem::model::dummy::dummy_weights(&config, 0).unwrap_err();
    assert!(format!("{err}").contains("host memory"), "{err}");
}
