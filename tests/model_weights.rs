//! Loading safetensors checkpoints written here: dense, sharded, compressed-tensors FP8, tied,
//! and every malformed case with its error message.

use candle_core::{DType, Tensor};
use float8::F8E4M3;
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use tandem::model::{load_weights, LoadFormat, ModelFiles};

const H: usize = 8; // hidden
const I: usize = 16; // intermediate
const V: usize = 10; // vocab
const KV: usize = 4; // 1 kv head × head_dim 4

fn config(fp8: bool, tied: bool) -> serde_json::Value {
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": V,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
        "tie_word_embeddings": tied,
    });
    if fp8 {
        let scheme = |strategy: &str, dynamic: bool| json!({"num_bits": 8, "type": "float", "strategy": strategy, "dynamic": dynamic, "symmetric": true});
        c["quantization_config"] = json!({
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"],
                "weights": scheme("channel", false), "input_activations": scheme("token", true)}},
            "ignore": ["lm_head"],
        });
    }
    c
}

/// A stored tensor: dtype, shape, raw little-endian bytes.
type Stored = (Dtype, Vec<usize>, Vec<u8>);

/// Values exactly representable in BF16 (seeds below 8): `seed + (k mod 16)/16` for element k.
fn values(seed: f32, n: usize) -> Vec<f32> {
    (0..n).map(|k| seed + (k % 16) as f32 / 16.0).collect()
}

fn bf16_tensor(seed: f32, shape: &[usize]) -> Stored {
    let n = shape.iter().product();
    let bytes = values(seed, n)
        .iter()
        .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
        .collect();
    (Dtype::BF16, shape.to_vec(), bytes)
}

fn fp8_tensor(shape: &[usize]) -> Stored {
    let n = shape.iter().product();
    let bytes = values(-0.5, n)
        .iter()
        .map(|x| F8E4M3::from_f32(*x).to_bits())
        .collect();
    (Dtype::F8_E4M3, shape.to_vec(), bytes)
}

fn linears() -> Vec<(String, usize, usize)> {
    let m = |n: &str| format!("model.layers.0.{n}");
    vec![
        (m("self_attn.q_proj"), H, H),
        (m("self_attn.k_proj"), KV, H),
        (m("self_attn.v_proj"), KV, H),
        (m("self_attn.o_proj"), H, H),
        (m("mlp.gate_proj"), I, H),
        (m("mlp.up_proj"), I, H),
        (m("mlp.down_proj"), H, I),
    ]
}

/// Every tensor of the tiny model, as a checkpoint would store it.
fn checkpoint(fp8: bool, tied: bool) -> BTreeMap<String, Stored> {
    let mut t = BTreeMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        bf16_tensor(1.0, &[V, H]),
    );
    t.insert("model.norm.weight".into(), bf16_tensor(2.0, &[H]));
    for n in ["input_layernorm", "post_attention_layernorm"] {
        t.insert(format!("model.layers.0.{n}.weight"), bf16_tensor(3.0, &[H]));
    }
    for (i, (module, out, inp)) in linears().into_iter().enumerate() {
        if fp8 {
            t.insert(format!("{module}.weight"), fp8_tensor(&[out, inp]));
            t.insert(
                format!("{module}.weight_scale"),
                bf16_tensor(0.5, &[out, 1]),
            );
        } else {
            t.insert(
                format!("{module}.weight"),
                bf16_tensor(i as f32, &[out, inp]),
            );
        }
    }
    if !tied {
        t.insert("lm_head.weight".into(), bf16_tensor(4.0, &[V, H]));
    }
    t
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Stored>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, (dt, shape, bytes))| {
            (
                k.clone(),
                TensorView::new(*dt, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

fn model_dir(config: &serde_json::Value, tensors: &BTreeMap<String, Stored>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    write_safetensors(&dir.path().join("model.safetensors"), tensors);
    dir
}

fn load(dir: &Path) -> anyhow::Result<tandem::model::LlamaWeights> {
    let files = ModelFiles::resolve(dir.to_str().unwrap())?;
    load_weights(&files, LoadFormat::Safetensors, 0)
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", load(dir).expect_err("loading should fail"))
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn loads_single_file_bf16() {
    let dir = model_dir(&config(false, false), &checkpoint(false, false));
    let files = ModelFiles::resolve(dir.path().to_str().unwrap()).unwrap();
    assert!(
        files.tokenizer.is_none(),
        "no tokenizer.json: runs on token ids"
    );
    let w = load_weights(&files, LoadFormat::Safetensors, 0).unwrap();
    assert_eq!(w.embed_tokens.dtype(), DType::BF16);
    assert_eq!(f32s(&w.embed_tokens), values(1.0, V * H));
    assert_eq!(f32s(&w.norm), values(2.0, H));
    let tandem::model::Linear::Dense { weight } = &w.layers[0].down_proj else {
        panic!("dense checkpoint gives dense linears")
    };
    assert_eq!(weight.dims(), &[H, I]);
    assert_eq!(f32s(weight), values(6.0, H * I));
    let tandem::model::Linear::Dense { weight } = &w.lm_head else {
        panic!()
    };
    assert_eq!(f32s(weight), values(4.0, V * H));
}

#[test]
fn loads_sharded_checkpoint_via_index() {
    let all = checkpoint(false, false);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config(false, false).to_string(),
    )
    .unwrap();
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in all.iter().enumerate() {
        let shard = if i % 2 == 0 { &mut a } else { &mut b };
        shard.insert(name.clone(), t.clone());
        let file = format!("model-0000{}-of-00002.safetensors", 1 + i % 2);
        weight_map.insert(name.clone(), json!(file));
    }
    write_safetensors(&dir.path().join("model-00001-of-00002.safetensors"), &a);
    write_safetensors(&dir.path().join("model-00002-of-00002.safetensors"), &b);
    let index = json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let w = load(dir.path()).unwrap();
    assert_eq!(f32s(&w.embed_tokens), values(1.0, V * H));
    assert_eq!(f32s(w.layers[0].q_proj.weight()), values(0.0, H * H));
    assert_eq!(f32s(w.layers[0].up_proj.weight()), values(5.0, I * H));

    // A shard named by the index but absent.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("missing shard") && err.contains("model-00002-of-00002"),
        "{err}"
    );
}

#[test]
fn loads_compressed_tensors_fp8() {
    let dir = model_dir(&config(true, false), &checkpoint(true, false));
    let w = load(dir.path()).unwrap();
    for l in [
        &w.layers[0].q_proj,
        &w.layers[0].k_proj,
        &w.layers[0].down_proj,
    ] {
        let tandem::model::Linear::Fp8 { weight, scale } = l else {
            panic!("quantized linears are FP8")
        };
        let (out, inp) = l.dims();
        assert_eq!(weight.dtype(), DType::F8E4M3);
        assert_eq!(scale.dtype(), DType::F32);
        assert_eq!(scale.dims(), &[out, 1]);
        assert_eq!(f32s(scale), values(0.5, out));
        let want: Vec<f32> = values(-0.5, out * inp)
            .iter()
            .map(|x| F8E4M3::from_f32(*x).to_f32())
            .collect();
        assert_eq!(f32s(weight), want);
    }
    // lm_head is in `ignore`: stays BF16.
    let tandem::model::Linear::Dense { weight } = &w.lm_head else {
        panic!("lm_head is ignored by the quantization config")
    };
    assert_eq!(weight.dtype(), DType::BF16);
}

#[test]
fn tied_embeddings_share_the_embedding() {
    let dir = model_dir(&config(false, true), &checkpoint(false, true));
    let w = load(dir.path()).unwrap();
    let tandem::model::Linear::Dense { weight } = &w.lm_head else {
        panic!()
    };
    assert_eq!(f32s(weight), f32s(&w.embed_tokens));
}

#[test]
fn untied_model_without_lm_head_names_the_tensor() {
    let dir = model_dir(&config(false, false), &checkpoint(false, true));
    let err = load_err(dir.path());
    assert!(
        err.contains("missing tensor `lm_head.weight`") && err.contains("[10, 8]"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let mut t = checkpoint(false, false);
    t.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        bf16_tensor(0.0, &[8, 8]),
    );
    let dir = model_dir(&config(false, false), &t);
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight")
            && err.contains("[8, 8]")
            && err.contains("[4, 8]"),
        "{err}"
    );
}

#[test]
fn fp8_config_with_bf16_weight_is_a_dtype_error() {
    let mut t = checkpoint(true, false);
    t.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        bf16_tensor(0.0, &[I, H]),
    );
    let dir = model_dir(&config(true, false), &t);
    let err = load_err(dir.path());
    assert!(
        err.contains("mlp.up_proj.weight") && err.contains("dtype BF16"),
        "{err}"
    );
}

#[test]
fn static_input_scale_is_rejected() {
    let mut t = checkpoint(true, false);
    t.insert(
        "model.layers.0.self_attn.o_proj.input_scale".into(),
        bf16_tensor(1.0, &[1]),
    );
    let dir = model_dir(&config(true, false), &t);
    let err = load_err(dir.path());
    assert!(
        err.contains("o_proj.input_scale") && err.contains("static"),
        "{err}"
    );
}

#[test]
fn missing_weight_scale_is_named() {
    let mut t = checkpoint(true, false);
    t.remove("model.layers.0.mlp.gate_proj.weight_scale");
    let dir = model_dir(&config(true, false), &t);
    let err = load_err(dir.path());
    assert!(
        err.contains("missing tensor `model.layers.0.mlp.gate_proj.weight_scale`"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_reported() {
    let dir = model_dir(&config(false, false), &checkpoint(false, false));
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("malformed safetensors") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&path, &bytes[..4]).unwrap();
    assert!(load_err(dir.path()).contains("malformed safetensors"));
    std::fs::write(&path, b"\x10\0\0\0\0\0\0\0not json at all!").unwrap();
    assert!(load_err(dir.path()).contains("header is not JSON"));
}

#[test]
fn directory_without_weights_suggests_dummy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config(false, false).to_string(),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("no *.safetensors") && err.contains("--load-format dummy"),
        "{err}"
    );
    // ...and dummy weights need nothing else.
    let files = ModelFiles::resolve(dir.path().to_str().unwrap()).unwrap();
    let w = load_weights(&files, LoadFormat::Dummy, 1).unwrap();
    assert_eq!(w.layers[0].gate_proj.dims(), (I, H));
}

/// The transformers-made fixtures of the CPU reference tests (tied embeddings; BF16 and FP8).
#[test]
fn loads_transformers_fixtures() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let bf16 = load(Path::new(&format!("{root}/llama-bf16"))).unwrap();
    assert!(matches!(
        bf16.layers[1].o_proj,
        tandem::model::Linear::Dense { .. }
    ));
    let files = ModelFiles::resolve(&format!("{root}/llama-fp8")).unwrap();
    let c = files.config.clone();
    let w = load_weights(&files, LoadFormat::Safetensors, 0).unwrap();
    assert_eq!(w.layers.len(), c.num_hidden_layers);
    for layer in &w.layers {
        let tandem::model::Linear::Fp8 { weight, scale } = &layer.gate_proj else {
            panic!("FP8 fixture has FP8 linears")
        };
        assert_eq!(weight.dims(), &[c.intermediate_size, c.hidden_size]);
        assert_eq!(scale.dims(), &[c.intermediate_size, 1]);
        assert!(f32s(scale).iter().all(|s| *s > 0.0));
    }
    assert!(c.tie_word_embeddings);
    let tandem::model::Linear::Dense { weight } = &w.lm_head else {
        panic!()
    };
    assert_eq!(f32s(weight), f32s(&w.embed_tokens));
}
