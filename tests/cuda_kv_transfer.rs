//! Device-to-device KV transfer (`kv::transfer::cuda`) between CUDA backends and pools: same GPU,
//! a peer GPU, and another process through a CUDA IPC handle, with TP1 → TP2 splits and TP2 → TP1
//! merges. Each result is compared byte for byte with the host path (`export_blocks` → `reshard`
//! → `import_blocks`). Then two CUDA engines of an embedded disaggregated deployment, the KV going
//! GPU to GPU, against an aggregated engine. Skips without a GPU; the two-GPU cases run on the same GPU (and say so)
//! when only one is visible.

use futures::StreamExt;
use parking_lot::Mutex;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tandem::backend::cuda::{gpu_available, CudaBackend, CudaOptions, WeightSource};
use tandem::backend::{
    Backend, Batch, DeviceSampling, Emit, KvCacheDtype, KvDtype, KvLayout, SeqChunk,
};
use tandem::engine::types::{GenerateRequest, SamplingParams};
use tandem::engine::{Engine, EngineConfig, EngineHandle};
use tandem::kv::transfer::cuda::plan::{copy_on_host, geometry, head_routes, HeadRoute};
use tandem::kv::transfer::cuda::{
    device_kv_imports, export_ipc, layer_streaming_hook, live_staging_buffers, CudaIpcPool,
    CudaKvCopier, OwnedKvPool,
};
use tandem::kv::transfer::{reshard, KvShards};
use tandem::model::config::LlamaConfig;
use tandem::worker::decode::DecodeConfig;
use tandem::worker::deployment::{start_embedded, EmbeddedSpec, EmbeddedTransport};
use tandem::worker::prefill::PrefillConfig;

const BS: usize = 16;
const HEADS: usize = 4;
const LAYERS: usize = 3;

fn config() -> LlamaConfig {
    LlamaConfig::from_json_str(&format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": {LAYERS}, "num_attention_heads": 8, "num_key_value_heads": {HEADS},
            "head_dim": 32, "vocab_size": 1000, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "torch_dtype": "bfloat16", "rope_scaling": {{"rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}}}}"#
    ))
    .unwrap()
}

fn layout(heads: usize) -> KvLayout {
    KvLayout {
        num_layers: LAYERS,
        num_kv_heads: heads,
        head_dim: 32,
        block_size: BS,
        dtype: KvDtype::Bf16,
    }
}

/// Number of visible GPUs; 0 (and a printed reason) when there is none.
fn gpus() -> usize {
    if !gpu_available() {
        eprintln!("skipping: no CUDA GPU on this machine");
        return 0;
    }
    cudarc::driver::result::device::get_count().unwrap() as usize
}

/// GPU 1 when there are two, else GPU 0 (printing that the peer case is not exercised).
fn second_gpu(n: usize) -> usize {
    if n >= 2 {
        1
    } else {
        eprintln!("only one GPU visible: the 'other GPU' runs on GPU 0 (no peer access exercised)");
        0
    }
}

/// A backend with random KV (seeded) in `num_blocks` blocks.
fn backend(device: usize, num_blocks: usize, kv_seed: u64) -> CudaBackend {
    backend_kv(device, num_blocks, kv_seed, KvCacheDtype::Auto)
}

/// The same with a given KV cache type.
fn backend_kv(device: usize, num_blocks: usize, kv_seed: u64, kv: KvCacheDtype) -> CudaBackend {
    let opts = CudaOptions {
        device,
        block_size: BS,
        num_blocks: Some(num_blocks),
        max_num_batched_tokens: 256,
        max_num_seqs: 8,
        kv_cache_dtype: kv,
        ..Default::default()
    };
    let mut b = CudaBackend::new(&config(), WeightSource::Dummy { seed: 3 }, opts).unwrap();
    b.fill_kv_random(kv_seed).unwrap();
    b
}

fn full_route(heads: usize) -> HeadRoute {
    HeadRoute {
        src_rank: 0,
        dst_rank: 0,
        src_head0: 0,
        dst_head0: 0,
        count: heads,
    }
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn copy_between_backends_equals_export_import() {
    let n = gpus();
    if n == 0 {
        return;
    }
    let mut devices = vec![0];
    if n >= 2 {
        devices.push(1);
    } else {
        eprintln!("one GPU: the peer-GPU case is skipped");
    }
    let src_ids = [5u32, 0, 17, 3];
    let dst_ids = [39u32, 8, 2, 21];
    let pairs: Vec<(u32, u32)> = src_ids.iter().copied().zip(dst_ids).collect();
    let all: Vec<u32> = (0..40).collect();
    for d in devices {
        let mut src = backend(0, 32, 1);
        let mut dst = backend(d, 40, 2);
        let mut reference = backend(d, 40, 2);
        let data = src.export_blocks(&src_ids).unwrap();
        reference.import_blocks(&dst_ids, &data).unwrap();
        let before = dst.export_blocks(&all).unwrap();

        let mut copier = CudaKvCopier::new(0).unwrap();
        copier.enable_peer(d).unwrap();
        let job = (src.kv_pool(), dst.kv_pool(), full_route(HEADS));
        copier.copy(&[job], &pairs).unwrap();

        let after = dst.export_blocks(&all).unwrap();
        assert!(after != before, "GPU 0 -> {d}: nothing was copied");
        assert!(
            after == reference.export_blocks(&all).unwrap(),
            "GPU 0 -> {d}: copy differs from export -> import"
        );
        // The source is untouched.
        assert_eq!(src.export_blocks(&src_ids).unwrap(), data);
    }
}

/// TP1 → TP2: each destination rank receives its heads, as `reshard` cuts them; then TP2 → TP1
/// merges them back into the original blocks.
#[test]
fn tp1_to_tp2_and_back_equal_reshard() {
    let n = gpus();
    if n == 0 {
        return;
    }
    let ranks = [0, second_gpu(n)];
    let src_ids = [6u32, 1, 9];
    let dst_ids = [11u32, 4, 0];
    let pairs: Vec<(u32, u32)> = src_ids.iter().copied().zip(dst_ids).collect();
    let mut src = backend(0, 12, 7);
    let data = src.export_blocks(&src_ids).unwrap();
    let want = reshard(&KvShards::single(layout(HEADS), data.clone()), 2).unwrap();

    let dst: Vec<OwnedKvPool> = ranks
        .iter()
        .map(|&d| OwnedKvPool::new(d, layout(HEADS / 2), 16).unwrap())
        .collect();
    dst.iter().for_each(|p| p.fill(0xEE).unwrap());
    let mut copier = CudaKvCopier::new(0).unwrap();
    let routes = head_routes(HEADS, 1, HEADS / 2, 2).unwrap();
    let jobs: Vec<_> = routes
        .iter()
        .map(|r| {
            copier.enable_peer(ranks[r.dst_rank]).unwrap();
            (src.kv_pool(), dst[r.dst_rank].pool(), *r)
        })
        .collect();
    copier.copy(&jobs, &pairs).unwrap();
    for (r, pool) in dst.iter().enumerate() {
        assert!(
            pool.read_blocks(&dst_ids).unwrap() == want.shards[r],
            "TP1 -> TP2 rank {r} (GPU {}) differs from reshard",
            ranks[r]
        );
        // Blocks not written keep the poison.
        let raw = pool.download().unwrap();
        let touched = dst_ids.len() * pool.pool().layout.block_bytes();
        let poisoned = raw.iter().filter(|&&b| b == 0xEE).count();
        assert!(
            poisoned >= raw.len() - touched,
            "rank {r}: bytes outside the blocks changed"
        );
    }

    // TP2 -> TP1: both ranks push their heads into one pool on GPU 0.
    let merged = OwnedKvPool::new(0, layout(HEADS), 8).unwrap();
    merged.fill(0xEE).unwrap();
    let back_ids = [2u32, 7, 5];
    let back: Vec<(u32, u32)> = dst_ids.iter().copied().zip(back_ids).collect();
    for route in head_routes(HEADS / 2, 2, HEADS, 1).unwrap() {
        let mut c = CudaKvCopier::new(ranks[route.src_rank]).unwrap();
        c.enable_peer(0).unwrap();
        c.copy(&[(dst[route.src_rank].pool(), merged.pool(), route)], &back)
            .unwrap();
    }
    assert!(
        merged.read_blocks(&back_ids).unwrap() == data,
        "TP2 -> TP1 merge does not restore the source blocks"
    );
}

/// The per-layer hook copies each layer while the prefill goes on; the result equals the
/// prefilled blocks (a copy that ran before its layer's KV write would hold the old random KV).
#[test]
fn layer_streaming_during_prefill_equals_the_prefilled_blocks() {
    let n = gpus();
    if n == 0 {
        return;
    }
    let d = second_gpu(n);
    let mut src = backend(0, 40, 5);
    let table = vec![9u32, 2, 30, 4];
    let dst_ids = [1u32, 7, 3, 12];
    let pairs: Vec<(u32, u32)> = table.iter().copied().zip(dst_ids).collect();
    let dst = OwnedKvPool::new(d, layout(HEADS), 16).unwrap();
    dst.fill(0xEE).unwrap();
    let before = src.export_blocks(&table).unwrap();

    let mut copier = CudaKvCopier::new(0).unwrap();
    copier.enable_peer(d).unwrap();
    copier.set_pairs(&pairs, 40, 16).unwrap();
    let copier = Arc::new(Mutex::new(copier));
    let job = (src.kv_pool(), dst.pool(), full_route(HEADS));
    let hook = layer_streaming_hook(copier.clone(), vec![job]).unwrap();
    src.set_layer_kv_hook(Some(hook));
    let tokens: Vec<u32> = (0..50).map(|i| (i * 37 + 11) % 1000).collect();
    let batch = Batch {
        seqs: vec![SeqChunk {
            tokens,
            start_pos: 0,
            block_table: table.clone(),
            emit: Emit::Sample(DeviceSampling {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                uniform: 0.0,
            }),
        }],
    };
    src.step(&batch).unwrap();
    copier.lock().synchronize().unwrap();
    src.set_layer_kv_hook(None);
    let prefilled = src.export_blocks(&table).unwrap();
    assert!(prefilled != before, "the prefill wrote no KV");
    assert!(
        dst.read_blocks(&dst_ids).unwrap() == prefilled,
        "layer-streamed copy differs from the prefilled blocks"
    );
}

const CHILD_ENV: &str = "TANDEM_KV_IPC_CHILD";
const IPC_BLOCKS: usize = 10;

/// A second process maps the pool of this one's child through its IPC handle and writes blocks
/// (TP1 → the child's pool); the child hashes its own memory, which must match the host reference.
#[test]
fn ipc_copy_into_another_process() {
    let n = gpus();
    if n == 0 {
        return;
    }
    let d = second_gpu(n);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "ipc_child_holds_a_pool",
            "--nocapture",
        ])
        .env(CHILD_ENV, d.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let expect_line = |prefix: &str| -> String {
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("child printed no {prefix} line in 120 s"));
            // libtest may have printed "test ... " on the same line.
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim().to_string();
            }
        }
    };
    let remote: CudaIpcPool = serde_json::from_str(&expect_line("IPC_POOL ")).unwrap();
    assert_eq!(remote.num_blocks, IPC_BLOCKS);

    let src = OwnedKvPool::new(0, layout(HEADS), 6).unwrap();
    let src_bytes = noise(src.pool().bytes, 9);
    src.upload(&src_bytes).unwrap();
    let pairs = [(4u32, 9u32), (0, 3), (5, 0)];
    let mut copier = CudaKvCopier::new(0).unwrap();
    let mapped = copier.open_ipc(&remote).unwrap();
    assert_eq!(
        copier.open_ipc(&remote).unwrap(),
        mapped,
        "mapping is cached"
    );
    copier
        .copy(&[(src.pool(), mapped, full_route(HEADS))], &pairs)
        .unwrap();

    let mut want = vec![0xEEu8; remote.bytes];
    let g = geometry(&src.pool(), &mapped, &full_route(HEADS)).unwrap();
    copy_on_host(&src_bytes, &mut want, &g, &pairs);
    writeln!(stdin, "check").unwrap();
    let hash = expect_line("IPC_HASH ");
    drop(copier); // closes the mapping before the child frees its pool
    drop(stdin);
    let status = child.wait().unwrap();
    assert_eq!(
        hash,
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&want)),
        "the child's pool differs from the host reference"
    );
    assert!(status.success(), "IPC child failed: {status}");
}

/// The other process of `ipc_copy_into_another_process` (run only by it).
#[test]
#[ignore = "run as a child process by ipc_copy_into_another_process"]
fn ipc_child_holds_a_pool() {
    let device: usize = std::env::var(CHILD_ENV)
        .expect("only run by ipc_copy_into_another_process")
        .parse()
        .unwrap();
    let pool = OwnedKvPool::new(device, layout(HEADS), IPC_BLOCKS).unwrap();
    pool.fill(0xEE).unwrap();
    let handle = export_ipc(&pool.pool()).unwrap();
    println!("IPC_POOL {}", serde_json::to_string(&handle).unwrap());
    std::io::stdout().flush().unwrap();
    let mut lines = std::io::stdin().lock().lines();
    let _check = lines.next();
    let raw = pool.download().unwrap();
    println!("IPC_HASH {:016x}", xxhash_rust::xxh3::xxh3_64(&raw));
    std::io::stdout().flush().unwrap();
    for _ in lines {} // until the parent closes stdin
}

fn disagg_engine(device: usize, kv_seed: u64, kv: KvCacheDtype) -> EngineHandle {
    let config = EngineConfig {
        max_model_len: Some(256),
        max_num_batched_tokens: 256,
        max_num_seqs: 8,
        ..Default::default()
    };
    Engine::start(Box::new(backend_kv(device, 64, kv_seed, kv)), None, config)
}

/// `n` prompt tokens, different for each seed.
fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 101 + 11) % 1000)
        .collect()
}

fn greedy_request(id: &str, prompt: Vec<u32>) -> GenerateRequest {
    GenerateRequest {
        id: id.into(),
        prompt_tokens: prompt,
        params: SamplingParams {
            max_tokens: 8,
            ignore_eos: true,
            ..Default::default()
        },
    }
}

async fn collect_tokens(
    stream: Result<tandem::worker::OutputStream, tandem::engine::types::EngineError>,
) -> Vec<u32> {
    let mut stream = stream.expect("request accepted");
    let mut tokens = Vec::new();
    while let Some(piece) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("no output in 60 s")
    {
        tokens.extend(piece.expect("no error").token_ids);
    }
    tokens
}

fn assert_no_kv_left(engines: &[(&str, &EngineHandle)]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for (name, e) in engines {
        while e.metrics().kv_blocks_active != 0 || e.metrics().running != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{name} engine leaked KV blocks: {:?}",
                e.metrics()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    while live_staging_buffers() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} KV staging buffers were never freed",
            live_staging_buffers()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The embedded disaggregated deployment with two CUDA engines (prefill on GPU 0, decode on GPU 1)
/// gives the greedy tokens of an aggregated engine, the KV going GPU to GPU (staged on the prefill
/// GPU, pulled by the decode GPU): a prompt of its own, then two sharing two blocks, the second
/// of which the decode engine finds in its prefix cache (a partial import of staged blocks 2..).
/// Requests run one at a time, so every engine's steps have the same shapes (bitwise equal maths).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_disagg_moves_kv_gpu_to_gpu_and_matches_aggregated() {
    let n = gpus();
    if n == 0 {
        return;
    }
    let (agg, prefill, decode) = disagg_matches_aggregated(n, KvCacheDtype::Auto).await;

    // Straight through the handles: a staged export, and an import for a request that is not
    // parked, which must be refused without touching any block.
    let export = prefill
        .prefill_and_export_on_device(greedy_request("x", tokens(40, 5)))
        .await
        .unwrap();
    let staged = export
        .device
        .clone()
        .expect("the export was staged on the GPU");
    assert!(export.kv.is_empty());
    assert_eq!(staged.num_blocks(), 3);
    assert_eq!(staged.device(), 0);
    let refused = decode
        .import_kv_device("nobody", vec![0, 1, 2], staged.clone(), 0)
        .await;
    assert!(
        refused.is_err(),
        "an import for no parked request was accepted"
    );
    drop((export, staged));
    assert_no_kv_left(&[("prefill", &prefill), ("decode", &decode)]);
    for e in [agg, prefill, decode] {
        e.shutdown();
    }
}

/// Runs the embedded disaggregated deployment (prefill on GPU 0, decode on GPU 1 or 0) with `kv`
/// pools on three prompts against an aggregated engine; returns the engines, all KV freed.
async fn disagg_matches_aggregated(
    n: usize,
    kv: KvCacheDtype,
) -> (EngineHandle, EngineHandle, EngineHandle) {
    let d = second_gpu(n);
    let agg = disagg_engine(0, 7, kv);
    let (prefill, decode) = (disagg_engine(0, 8, kv), disagg_engine(d, 9, kv));
    assert!(prefill.has_device_kv() && decode.has_device_kv());
    let deployment = start_embedded(EmbeddedSpec {
        agg: vec![],
        prefill: vec![prefill.clone()],
        decode: vec![decode.clone()],
        decode_config: DecodeConfig {
            conditional_disagg: false,
            ..Default::default()
        },
        prefill_config: PrefillConfig::default(),
        transport: EmbeddedTransport::InProcess,
    })
    .await
    .unwrap();
    let worker = deployment.workers[0].clone();
    let shared = tokens(2 * BS, 1);
    let prompts = [
        tokens(45, 2),
        [shared.clone(), tokens(13, 3)].concat(),
        [shared.clone(), tokens(20, 4)].concat(),
    ];
    let imports_before = device_kv_imports();
    for (i, prompt) in prompts.iter().enumerate() {
        let want =
            collect_tokens(agg.generate(greedy_request(&format!("a{i}"), prompt.clone()))).await;
        let got = collect_tokens(
            worker
                .generate(greedy_request(&format!("d{i}"), prompt.clone()))
                .await,
        )
        .await;
        assert_eq!(want.len(), 8, "prompt {i}: aggregated output {want:?}");
        assert_eq!(got, want, "prompt {i}: disaggregated tokens differ");
    }
    assert_eq!(
        device_kv_imports() - imports_before,
        prompts.len(),
        "not every remote prefill took the device path"
    );
    assert!(prefill.metrics().steps > 0, "the prefill engine never ran");
    drop(deployment);
    assert_no_kv_left(&[("prefill", &prefill), ("decode", &decode), ("agg", &agg)]);
    (agg, prefill, decode)
}

/// The same with FP8 (e4m3) KV pools on every engine: the codes move as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_disagg_with_fp8_kv_matches_aggregated() {
    let n = gpus();
    if n == 0 {
        return;
    }
    let (agg, prefill, decode) = disagg_matches_aggregated(n, KvCacheDtype::Fp8).await;
    for e in [agg, prefill, decode] {
        e.shutdown();
    }
}
