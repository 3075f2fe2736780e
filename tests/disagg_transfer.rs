//! KV transfer: in-process and TCP, same and mismatched tensor-parallel layouts, refusals.

use anyhow::{bail, Result};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;
use tandem::backend::{KvDtype, KvLayout};
use tandem::kv::transfer::local::InProcessTransfer;
use tandem::kv::transfer::tcp::{TcpKvServer, TcpTransfer};
use tandem::kv::transfer::{
    reshard, send_kv, BlockWrite, KvDestination, KvShards, KvSink, KvTransfer,
};

fn layout(heads: usize) -> KvLayout {
    KvLayout {
        num_layers: 2,
        num_kv_heads: heads,
        head_dim: 8,
        block_size: 4,
        dtype: KvDtype::Bf16,
    }
}

/// A decode worker's KV pool in host memory: one buffer per rank, plus the requests it waits for.
struct PoolSink {
    layout: KvLayout,
    ranks: Vec<Mutex<Vec<u8>>>,
    waiting: Mutex<HashSet<String>>,
}

impl PoolSink {
    fn new(layout: KvLayout, tp: usize, num_blocks: usize) -> Arc<Self> {
        let ranks = (0..tp)
            .map(|_| Mutex::new(vec![0u8; num_blocks * layout.block_bytes()]))
            .collect();
        Arc::new(Self {
            layout,
            ranks,
            waiting: Mutex::new(HashSet::new()),
        })
    }

    /// The blocks `ids` of every rank, in wire format.
    fn read(&self, ids: &[u32]) -> KvShards {
        let bb = self.layout.block_bytes();
        let shards = self
            .ranks
            .iter()
            .map(|pool| {
                let pool = pool.lock();
                ids.iter()
                    .flat_map(|&b| pool[b as usize * bb..(b as usize + 1) * bb].to_vec())
                    .collect()
            })
            .collect();
        KvShards {
            rank_layout: self.layout,
            shards,
        }
    }

    fn destination(&self, endpoint: tandem::kv::transfer::KvEndpoint) -> KvDestination {
        KvDestination {
            endpoints: vec![endpoint],
            rank_layout: self.layout,
            tp: self.ranks.len(),
        }
    }
}

impl KvSink for PoolSink {
    fn rank_layout(&self) -> KvLayout {
        self.layout
    }
    fn tp(&self) -> usize {
        self.ranks.len()
    }
    fn write_blocks(&self, write: BlockWrite) -> BoxFuture<'static, Result<()>> {
        let result = (|| {
            if !self.waiting.lock().contains(&write.request_id) {
                bail!("request {} is not waiting for KV", write.request_id);
            }
            let bb = self.layout.block_bytes();
            let mut pool = self.ranks[write.rank].lock();
            for (i, &b) in write.block_ids.iter().enumerate() {
                pool[b as usize * bb..(b as usize + 1) * bb]
                    .copy_from_slice(&write.data[i * bb..(i + 1) * bb]);
            }
            Ok(())
        })();
        Box::pin(async move { result })
    }
}

/// Source KV with distinct bytes everywhere: `num_blocks` blocks of `total_heads` heads over `tp` ranks.
fn source(total_heads: usize, tp: usize, num_blocks: usize, salt: u8) -> KvShards {
    let l = layout(total_heads / tp);
    let shards = (0..tp)
        .map(|r| {
            (0..num_blocks * l.block_bytes())
                .map(|i| (i * 7 + r * 131 + salt as usize) as u8)
                .collect()
        })
        .collect();
    KvShards {
        rank_layout: l,
        shards,
    }
}

async fn round_trip(
    transfer: Arc<dyn KvTransfer>,
    endpoint_of: impl Fn(
        Arc<PoolSink>,
    ) -> BoxFuture<
        'static,
        (
            tandem::kv::transfer::KvEndpoint,
            Box<dyn std::any::Any + Send>,
        ),
    >,
) {
    for (src_tp, dst_tp) in [(1, 1), (1, 2), (2, 1), (2, 4)] {
        let sink = PoolSink::new(layout(4 / dst_tp), dst_tp, 16);
        sink.waiting.lock().insert("req-1".into());
        let (endpoint, _keep) = endpoint_of(sink.clone()).await;
        let src = source(4, src_tp, 3, src_tp as u8);
        let dst_blocks = [9u32, 2, 14, 5]; // one more than needed: only the first three are written
        send_kv(
            std::slice::from_ref(&transfer),
            &sink.destination(endpoint),
            "req-1",
            &dst_blocks,
            src.clone(),
        )
        .await
        .unwrap();
        let got = sink.read(&dst_blocks[..3]);
        assert_eq!(
            got.shards,
            reshard(&src, dst_tp).unwrap().shards,
            "TP{src_tp} -> TP{dst_tp}"
        );
        // Merged back to the source's layout, the bytes are the source's.
        assert_eq!(
            reshard(&got, src_tp).unwrap().shards,
            src.shards,
            "TP{src_tp} -> TP{dst_tp} -> back"
        );
        assert!(
            sink.read(&[5])
                .shards
                .iter()
                .all(|s| s.iter().all(|&b| b == 0)),
            "an extra block was written"
        );
    }
}

#[tokio::test]
async fn in_process_transfer_moves_blocks_across_tp_layouts() {
    let registry = InProcessTransfer::new();
    let r = registry.clone();
    round_trip(Arc::new(registry), move |sink| {
        let (endpoint, reg) = r.register("decode-0", sink);
        Box::pin(async move { (endpoint, Box::new(reg) as Box<dyn std::any::Any + Send>) })
    })
    .await;
}

#[tokio::test]
async fn tcp_transfer_moves_blocks_across_tp_layouts() {
    round_trip(Arc::new(TcpTransfer::new()), |sink| {
        Box::pin(async move {
            let server = TcpKvServer::start("127.0.0.1:0", "127.0.0.1", sink)
                .await
                .unwrap();
            (
                server.endpoint(),
                Box::new(server) as Box<dyn std::any::Any + Send>,
            )
        })
    })
    .await;
}

#[tokio::test]
async fn writes_for_a_request_not_waiting_are_refused_and_touch_nothing() {
    let sink = PoolSink::new(layout(4), 1, 8);
    let server = TcpKvServer::start("127.0.0.1:0", "127.0.0.1", sink.clone())
        .await
        .unwrap();
    let transfer: Arc<dyn KvTransfer> = Arc::new(TcpTransfer::new());
    let err = send_kv(
        std::slice::from_ref(&transfer),
        &sink.destination(server.endpoint()),
        "gone",
        &[1, 2],
        source(4, 1, 2, 1),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("not waiting"), "{err:#}");
    assert!(sink.read(&[1, 2]).shards[0].iter().all(|&b| b == 0));
    // The connection survives a refusal: the next write on it goes through.
    sink.waiting.lock().insert("ok".into());
    send_kv(
        &[transfer],
        &sink.destination(server.endpoint()),
        "ok",
        &[1, 2],
        source(4, 1, 2, 1),
    )
    .await
    .unwrap();
    assert_eq!(sink.read(&[1, 2]).shards, source(4, 1, 2, 1).shards);
}

#[tokio::test]
async fn mismatched_layouts_and_short_destinations_are_errors() {
    let sink = PoolSink::new(layout(4), 1, 8);
    sink.waiting.lock().insert("r".into());
    let registry = InProcessTransfer::new();
    let (endpoint, _reg) = registry.register("d", sink.clone());
    let transfer: Arc<dyn KvTransfer> = Arc::new(registry.clone());
    let dest = sink.destination(endpoint.clone());
    // Three blocks into two destination blocks.
    assert!(send_kv(
        std::slice::from_ref(&transfer),
        &dest,
        "r",
        &[0, 1],
        source(4, 1, 3, 0)
    )
    .await
    .is_err());
    // A source with a different head dimension.
    let mut other = source(4, 1, 1, 0);
    other.rank_layout.head_dim = 4;
    other.shards[0].truncate(other.rank_layout.block_bytes());
    let err = send_kv(std::slice::from_ref(&transfer), &dest, "r", &[0], other)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("layout mismatch"), "{err}");
    // No transfer reaches a TCP endpoint from an in-process-only sender.
    let tcp_dest = sink.destination(tandem::kv::transfer::KvEndpoint::Tcp {
        addr: "127.0.0.1:1".into(),
    });
    assert!(
        send_kv(&[transfer], &tcp_dest, "r", &[0], source(4, 1, 1, 0))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn tcp_transfer_to_a_dead_server_fails_fast() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let sink = PoolSink::new(layout(4), 1, 4);
    let dest = sink.destination(tandem::kv::transfer::KvEndpoint::Tcp { addr });
    let t0 = std::time::Instant::now();
    let transfer: Arc<dyn KvTransfer> = Arc::new(TcpTransfer::new());
    assert!(send_kv(&[transfer], &dest, "r", &[0], source(4, 1, 1, 0))
        .await
        .is_err());
    assert!(t0.elapsed().as_secs() < 6);
}
