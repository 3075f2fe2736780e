//! Throughput of the TCP KV transfer: the KV of one prompt, in its real block layout, sent from a
//! "prefill" buffer into a "decode" KV pool through `send_kv` (TCP over loopback by default).
//!
//! `cargo run --release --example kv_transfer_bench -- --tokens 3000` (defaults: the 70B model's
//! KV shape, 80 layers × 8 KV heads × 128, BF16, 128-token blocks). `--dst-tp 2` also cuts the
//! heads for a TP2 destination. Between machines: `--listen 0.0.0.0:7000` on the decode side,
//! `--connect HOST:7000` on the other, with the same shape flags.

use anyhow::Result;
use clap::Parser;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Instant;
use tandem::backend::{KvDtype, KvLayout};
use tandem::kv::transfer::tcp::{TcpKvServer, TcpTransfer};
use tandem::kv::transfer::{
    send_kv, BlockWrite, KvDestination, KvEndpoint, KvShards, KvSink, KvTransfer,
};

#[derive(Parser)]
struct Args {
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
    /// Tensor-parallel size of the destination (its ranks receive their share of the heads).
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

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let full = KvLayout {
        num_layers: a.layers,
        num_kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        block_size: a.block_size,
        dtype: KvDtype::Bf16,
    };
    let rank_layout = KvLayout {
        num_kv_heads: a.kv_heads / a.dst_tp,
        ..full
    };
    let num_blocks = a.tokens.div_ceil(a.block_size);
    let pool_blocks = 2 * num_blocks + 1;
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
    let src = KvShards::single(
        full,
        (0..num_blocks * full.block_bytes())
            .map(|i| (i % 251) as u8)
            .collect(),
    );
    let bytes = src.shards[0].len();
    let dest = KvDestination {
        endpoints: vec![endpoint],
        rank_layout,
        tp: a.dst_tp,
    };
    // Destination blocks scattered over the pool, as a real allocation is.
    let dst_blocks: Vec<u32> = (0..num_blocks as u32)
        .map(|i| (i * 2 + 1) % pool_blocks as u32)
        .collect();
    let transfers: Vec<Arc<dyn KvTransfer>> = vec![Arc::new(TcpTransfer::new())];
    send_kv(&transfers, &dest, "warmup", &dst_blocks, src.clone()).await?;
    let mut best = f64::MAX;
    let mut total = 0.0;
    for i in 0..a.iters {
        let src = src.clone();
        let t0 = Instant::now();
        send_kv(&transfers, &dest, &format!("r{i}"), &dst_blocks, src).await?;
        let s = t0.elapsed().as_secs_f64();
        best = best.min(s);
        total += s;
    }
    let mean = total / a.iters as f64;
    let gbps = |s: f64| bytes as f64 / s / 1e9;
    println!(
        "{}",
        serde_json::json!({
            "tokens": a.tokens, "blocks": num_blocks, "bytes": bytes, "dst_tp": a.dst_tp,
            "mean_ms": mean * 1e3, "best_ms": best * 1e3,
            "mean_gb_per_s": gbps(mean), "best_gb_per_s": gbps(best),
        })
    );
    Ok(())
}
