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
