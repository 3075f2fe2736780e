//! Throughput of KV transfer: the KV of one prompt, in its real block layout, moved from a
//! "prefill" pool into a "decode" KV pool's scattered blocks.
//!
//! `cargo run --release --example kv_transfer_bench -- --tokens 3000` (defaults: the 70B model's
//! KV shape, 80 layers × 8 KV heads × 128, BF16, 128-token blocks; 24 blocks, 1.0 GB).
//!
//! - `--transport tcp` (default): host-staged through `send_kv` and TCP over loopback; `--dst-tp 2`
//!   also cuts the heads for a TP2 destination. Between machines: `--listen 0.0.0.0:7000` on the
//!   decode side, `--connect HOST:7000` on the other, with the same shape flags.
//! - `--transport cuda-peer`: device to device with `kv::transfer::cuda` from `--src-gpu` into
//!   pools on `--dst-gpus` (one per destination rank: `--dst-gpus 1` is TP1 on GPU 1,
//!   `--dst-gpus 0,1` TP2), peer access inside this process.
//! - `--transport cuda-ipc`: the same, into pools owned by child processes (one per destination
//!   GPU) and mapped here from their CUDA IPC handles, as between a prefill and a decode process.
//! - `--overlap-model M` (with `cuda-peer`): also prefills the prompt with model `M` (dummy
//!   weights) on `--src-gpu` and times prefill + transfer with the copy after the prefill against
//!   the copy streamed layer by layer while the prefill runs.
//!
//! Every CUDA run checks the destination blocks against `reshard` of the source blocks.

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;
use tandem::backend::cuda::{CudaBackend, CudaOptions, WeightSource};
use tandem::backend::{
    Backend, Batch, CudaKvPool, DeviceSampling, Emit, KvDtype, KvLayout, SeqChunk,
};
use tandem::kv::transfer::cuda::plan::{head_routes, HeadRoute};
use tandem::kv::transfer::cuda::{
    export_ipc, layer_streaming_hook, read_blocks, CudaIpcPool, CudaKvCopier, OwnedKvPool,
};
use tandem::kv::transfer::tcp::{TcpKvServer, TcpTransfer};
use tandem::kv::transfer::{
    reshard, send_kv, BlockWrite, KvDestination, KvEndpoint, KvShards, KvSink, KvTransfer,
};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    Tcp,
    CudaPeer,
    CudaIpc,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
    #[arg(long, default_value_t = 3000)]
    tokens: usize,
    #[arg(long, default_value_t = 80)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 128)]
    block_size: usize,
    /// Tensor-parallel size of the destination (TCP; the CUDA transports use one rank per GPU of
    /// `--dst-gpus`).
    #[arg(long, default_value_t = 1)]
    dst_tp: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Only run a receiving server on this address.
    #[arg(long)]
    listen: Option<String>,
    /// Send to a server started elsewhere with `--listen`.
    #[arg(long)]
    connect: Option<String>,
    /// GPU holding the prefill side's KV.
    #[arg(long, default_value_t = 0)]
    src_gpu: usize,
    /// GPUs of the destination ranks, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    dst_gpus: Vec<usize>,
    /// Also time a prefill of the prompt with this model (dummy weights) with the transfer after
    /// it and streamed layer by layer (cuda-peer only).
    #[arg(long)]
    overlap_model: Option<String>,
    /// Internal: be the decode process of `cuda-ipc` holding a pool on this GPU.
    #[arg(long, hide = true)]
    ipc_child_gpu: Option<usize>,
}

impl Args {
    fn layout(&self, heads: usize) -> KvLayout {
        KvLayout {
            num_layers: self.layers,
            num_kv_heads: heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            dtype: KvDtype::Bf16,
        }
    }
    fn num_blocks(&self) -> usize {
        self.tokens.div_ceil(self.block_size)
    }
    /// Destination pool size: room for the prompt twice over, so its blocks are scattered.
    fn dst_pool_blocks(&self) -> usize {
        2 * self.num_blocks() + 1
    }
}

/// `n` distinct block ids below `pool`, scattered (a fixed pseudo-random permutation).
fn scattered(n: usize, pool: usize, salt: u64) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..pool as u32).collect();
    let mut x = salt.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids.truncate(n);
    ids
}

fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x2545F4914F6CDD1Du64;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A decode worker's KV pool in host memory (one per rank); writes copy into it.
struct Pool {
    layout: KvLayout,
    tp: usize,
    ranks: Vec<Mutex<Vec<u8>>>,
}

impl KvSink for Pool {
    fn rank_layout(&self) -> KvLayout {
        self.layout
    }
    fn tp(&self) -> usize {
        self.tp
    }
    fn write_blocks(&self, write: BlockWrite) -> BoxFuture<'static, Result<()>> {
        let bb = self.layout.block_bytes();
        let mut pool = self.ranks[write.rank].lock();
        for (i, &b) in write.block_ids.iter().enumerate() {
            let b = b as usize;
            pool[b * bb..(b + 1) * bb].copy_from_slice(&write.data[i * bb..(i + 1) * bb]);
        }
        Box::pin(async { Ok(()) })
    }
}

fn report(a: &Args, bytes: usize, times: &[f64], extra: serde_json::Value) -> serde_json::Value {
    let best = times.iter().cloned().fold(f64::MAX, f64::min);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let gbps = |s: f64| bytes as f64 / s / 1e9;
    let mut out = json!({
        "tokens": a.tokens, "blocks": a.num_blocks(), "bytes": bytes,
        "mean_ms": mean * 1e3, "best_ms": best * 1e3,
        "mean_gb_per_s": gbps(mean), "best_gb_per_s": gbps(best),
    });
    if let (Some(o), serde_json::Value::Object(e)) = (out.as_object_mut(), extra) {
        o.extend(e);
    }
    out
}

async fn run_tcp(a: &Args) -> Result<()> {
    let full = a.layout(a.kv_heads);
    let rank_layout = a.layout(a.kv_heads / a.dst_tp);
    let num_blocks = a.num_blocks();
    let pool_blocks = a.dst_pool_blocks();
    let pool = Arc::new(Pool {
        layout: rank_layout,
        tp: a.dst_tp,
        ranks: (0..a.dst_tp)
            .map(|_| Mutex::new(vec![0u8; pool_blocks * rank_layout.block_bytes()]))
            .collect(),
    });
    if let Some(addr) = &a.listen {
        let host = addr.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
        let server = TcpKvServer::start(addr, host, pool).await?;
        eprintln!("receiving at {:?}; Ctrl-C to stop", server.endpoint());
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }
    let (endpoint, _server) = match &a.connect {
        Some(addr) => (KvEndpoint::Tcp { addr: addr.clone() }, None),
        None => {
            let server = TcpKvServer::start("127.0.0.1:0", "127.0.0.1", pool.clone()).await?;
            (server.endpoint(), Some(server))
        }
    };
    let src = KvShards::single(full, noise(num_blocks * full.block_bytes()));
    let bytes = src.shards[0].len();
    let dest = KvDestination {
        endpoints: vec![endpoint],
        rank_layout,
        tp: a.dst_tp,
    };
    let dst_blocks = scattered(num_blocks, pool_blocks, 1);
    let transfers: Vec<Arc<dyn KvTransfer>> = vec![Arc::new(TcpTransfer::new())];
    send_kv(&transfers, &dest, "warmup", &dst_blocks, src.clone()).await?;
    let mut times = Vec::new();
    for i in 0..a.iters {
        let src = src.clone();
        let t0 = Instant::now();
        send_kv(&transfers, &dest, &format!("r{i}"), &dst_blocks, src).await?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let extra = json!({"transport": "tcp", "dst_tp": a.dst_tp});
    println!("{}", report(a, bytes, &times, extra));
    Ok(())
}

/// The decode process of `cuda-ipc`: owns a pool, prints its IPC handle, lives until stdin closes.
fn run_ipc_child(a: &Args, gpu: usize) -> Result<()> {
    let tp = a.dst_gpus.len();
    let pool = OwnedKvPool::new(gpu, a.layout(a.kv_heads / tp), a.dst_pool_blocks())?;
    pool.fill(0)?;
    println!(
        "IPC_POOL {}",
        serde_json::to_string(&export_ipc(&pool.pool())?)?
    );
    std::io::stdout().flush()?;
    for _ in std::io::stdin().lock().lines() {}
    Ok(())
}

/// Spawns the `cuda-ipc` decode process for `gpu` and reads its pool's handle.
fn spawn_ipc_child(gpu: usize) -> Result<(Child, CudaIpcPool)> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.extend(["--ipc-child-gpu".into(), gpu.to_string()]);
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        if let Some(json) = line?.strip_prefix("IPC_POOL ") {
            return Ok((child, serde_json::from_str(json)?));
        }
    }
    bail!("the IPC child for GPU {gpu} exited without a pool handle")
}

fn run_cuda(a: &Args) -> Result<()> {
    let tp = a.dst_gpus.len();
    ensure!(
        tp > 0 && a.kv_heads.is_multiple_of(tp),
        "--dst-gpus must divide the KV heads"
    );
    let (num_blocks, pool_blocks) = (a.num_blocks(), a.dst_pool_blocks());
    let full = a.layout(a.kv_heads);
    let src = OwnedKvPool::new(a.src_gpu, full, num_blocks + 8)?;
    src.upload(&noise(src.pool().bytes))?;
    let src_ids = scattered(num_blocks, num_blocks + 8, 2);
    let dst_ids = scattered(num_blocks, pool_blocks, 3);
    let pairs: Vec<(u32, u32)> = src_ids
        .iter()
        .copied()
        .zip(dst_ids.iter().copied())
        .collect();

    let mut copier = CudaKvCopier::new(a.src_gpu)?;
    let mut owned = Vec::new();
    let mut children = Vec::new();
    let mut dst_pools: Vec<CudaKvPool> = Vec::new();
    for &gpu in &a.dst_gpus {
        if a.transport == Transport::CudaIpc {
            let (child, remote) = spawn_ipc_child(gpu)?;
            children.push(child);
            dst_pools.push(copier.open_ipc(&remote)?);
        } else {
            let pool = OwnedKvPool::new(gpu, a.layout(a.kv_heads / tp), pool_blocks)?;
            copier.enable_peer(gpu)?;
            dst_pools.push(pool.pool());
            owned.push(pool);
        }
    }
    let routes = head_routes(a.kv_heads, 1, a.kv_heads / tp, tp)?;
    let jobs: Vec<(CudaKvPool, CudaKvPool, HeadRoute)> = routes
        .iter()
        .map(|r| (src.pool(), dst_pools[r.dst_rank], *r))
        .collect();
    copier.copy(&jobs, &pairs)?; // warm-up
    let mut times = Vec::new();
    for _ in 0..a.iters {
        let t0 = Instant::now();
        for (s, d, r) in &jobs {
            copier.launch(s, d, r, 0..a.layers)?;
        }
        copier.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let want = reshard(&KvShards::single(full, src.read_blocks(&src_ids)?), tp)?;
    copier.synchronize()?; // binds the copier's context for reading the mapped pools
    let verified = dst_pools
        .iter()
        .zip(&want.shards)
        .all(|(pool, shard)| read_blocks(pool, &dst_ids).is_ok_and(|got| &got == shard));
    let bytes = num_blocks * full.block_bytes();
    let name = if a.transport == Transport::CudaIpc {
        "cuda-ipc"
    } else {
        "cuda-peer"
    };
    let extra = json!({"transport": name, "src_gpu": a.src_gpu, "dst_gpus": a.dst_gpus,
        "dst_tp": tp, "verified": verified});
    println!("{}", report(a, bytes, &times, extra));
    drop(copier); // closes the IPC mappings before the children free their pools
    for mut child in children {
        drop(child.stdin.take());
        child.wait()?;
    }
    ensure!(verified, "destination blocks differ from the source's");
    if let Some(model) = &a.overlap_model {
        drop(src);
        run_overlap(a, model, &owned, &dst_ids)?;
    }
    Ok(())
}

/// Prefill + transfer, the copy after the prefill vs streamed layer by layer during it.
fn run_overlap(a: &Args, model: &str, dst: &[OwnedKvPool], dst_ids: &[u32]) -> Result<()> {
    ensure!(
        !dst.is_empty(),
        "--overlap-model needs --transport cuda-peer"
    );
    let files = tandem::model::ModelFiles::resolve(model)?;
    let config = files.config;
    let num_blocks = a.num_blocks();
    let opts = CudaOptions {
        device: a.src_gpu,
        block_size: a.block_size,
        num_blocks: Some(num_blocks + 8),
        max_num_batched_tokens: a.tokens,
        max_num_seqs: 8,
        gpu_memory_utilization: 0.95,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut b = CudaBackend::new(&config, WeightSource::Dummy { seed: 0 }, opts)
        .with_context(|| format!("loading {model} (dummy)"))?;
    let load_s = t0.elapsed().as_secs_f64();
    let tp = dst.len();
    ensure!(
        b.kv_layout() == a.layout(config.num_key_value_heads)
            && a.kv_heads == config.num_key_value_heads,
        "the model's KV layout {:?} differs from the benchmark's shape flags",
        b.kv_layout()
    );
    let src_ids = scattered(num_blocks, num_blocks + 8, 4);
    let pairs: Vec<(u32, u32)> = src_ids
        .iter()
        .copied()
        .zip(dst_ids.iter().copied())
        .collect();
    let routes = head_routes(a.kv_heads, 1, a.kv_heads / tp, tp)?;
    let jobs: Vec<(CudaKvPool, CudaKvPool, HeadRoute)> = routes
        .iter()
        .map(|r| (b.kv_pool(), dst[r.dst_rank].pool(), *r))
        .collect();
    let mut copier = CudaKvCopier::new(a.src_gpu)?;
    for p in dst {
        copier.enable_peer(p.pool().device)?;
    }
    copier.set_pairs(&pairs, num_blocks + 8, dst[0].pool().num_blocks)?;
    let copier = Arc::new(Mutex::new(copier));
    let batch = Batch {
        seqs: vec![SeqChunk {
            tokens: (0..a.tokens as u32)
                .map(|i| (i * 31 + 5) % config.vocab_size as u32)
                .collect(),
            start_pos: 0,
            block_table: src_ids.clone(),
            emit: Emit::Sample(DeviceSampling {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                uniform: 0.0,
            }),
        }],
    };
    let digest = |dst: &[OwnedKvPool]| -> Result<Vec<u64>> {
        dst.iter()
            .map(|p| Ok(xxhash_rust::xxh3::xxh3_64(&p.read_blocks(dst_ids)?)))
            .collect()
    };
    b.step(&batch)?; // warm-up
    let (mut alone, mut after, mut streamed) = (vec![], vec![], vec![]);
    let (mut after_digest, mut streamed_digest) = (vec![], vec![]);
    for i in 0..a.iters.max(1) {
        let t0 = Instant::now();
        b.step(&batch)?;
        alone.push(t0.elapsed().as_secs_f64() * 1e3);

        dst.iter().try_for_each(|p| p.fill(0))?;
        let t0 = Instant::now();
        b.step(&batch)?;
        {
            let c = copier.lock();
            for (s, d, r) in &jobs {
                c.launch(s, d, r, 0..a.layers)?;
            }
            c.synchronize()?;
        }
        after.push(t0.elapsed().as_secs_f64() * 1e3);
        if i == 0 {
            after_digest = digest(dst)?;
        }

        dst.iter().try_for_each(|p| p.fill(0))?;
        b.set_layer_kv_hook(Some(layer_streaming_hook(copier.clone(), jobs.clone())?));
        let t0 = Instant::now();
        b.step(&batch)?;
        copier.lock().synchronize()?;
        streamed.push(t0.elapsed().as_secs_f64() * 1e3);
        b.set_layer_kv_hook(None);
        if i == 0 {
            streamed_digest = digest(dst)?;
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let same = after_digest == streamed_digest;
    println!(
        "{}",
        json!({
            "overlap_model": model, "load_seconds": load_s, "tokens": a.tokens,
            "dst_gpus": a.dst_gpus, "iters": alone.len(),
            "prefill_ms": mean(&alone), "prefill_then_copy_ms": mean(&after),
            "prefill_layer_streamed_ms": mean(&streamed),
            "saved_ms": mean(&after) - mean(&streamed),
            "prefill_ms_all": alone, "prefill_then_copy_ms_all": after,
            "prefill_layer_streamed_ms_all": streamed,
            "streamed_equals_copy_after": same,
        })
    );
    ensure!(
        same,
        "layer-streamed KV differs from the KV copied after the prefill"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(gpu) = a.ipc_child_gpu {
        return run_ipc_child(&a, gpu);
    }
    match a.transport {
        Transport::Tcp => run_tcp(&a).await,
        Transport::CudaPeer | Transport::CudaIpc => run_cuda(&a),
    }
}
