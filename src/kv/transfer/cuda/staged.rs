//! A prompt's KV parked on the device between two engines of one process: the prefill engine copies
//! its blocks into a small pool of its own ([`DeviceKv::stage`]), the decode engine copies them from
//! there into its blocks ([`DeviceKv::copy_into`]), and the staging memory is freed when the last
//! reference goes. Nothing goes through the host unless a transport needs bytes ([`DeviceKv::to_host`]).

use super::plan::head_routes;
use super::{CudaKvCopier, OwnedKvPool};
use crate::backend::{CudaKvPool, KvLayout};
use anyhow::{ensure, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static DEVICE_IMPORTS: AtomicUsize = AtomicUsize::new(0);

/// Staging buffers not yet freed (tests check that none leak).
pub fn live_staging_buffers() -> usize {
    LIVE.load(Ordering::SeqCst)
}

/// Device-to-device imports done since start (tests check the device path was taken).
pub fn device_kv_imports() -> usize {
    DEVICE_IMPORTS.load(Ordering::SeqCst)
}

/// `num_blocks` blocks of KV on one GPU, block `i` holding the prompt's block `i`.
pub struct DeviceKv {
    staging: Option<OwnedKvPool>,
    pool: CudaKvPool,
}

impl std::fmt::Debug for DeviceKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceKv({} blocks on GPU {})",
            self.pool.num_blocks, self.pool.device
        )
    }
}

/// The same staging buffer (there is only ever one owner of its memory).
impl PartialEq for DeviceKv {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl DeviceKv {
    /// Copies `blocks` of `src` (on the copier's GPU) into a new staging pool there and waits.
    pub fn stage(copier: &mut CudaKvCopier, src: &CudaKvPool, blocks: &[u32]) -> Result<Self> {
        ensure!(!blocks.is_empty(), "nothing to stage");
        ensure!(
            src.device == copier.device(),
            "staging copier on GPU {} for a pool on GPU {}",
            copier.device(),
            src.device
        );
        let staging = OwnedKvPool::new(src.device, src.layout, blocks.len())?;
        LIVE.fetch_add(1, Ordering::SeqCst);
        let kv = Self {
            pool: staging.pool(),
            staging: Some(staging),
        };
        let pairs: Vec<(u32, u32)> = blocks
            .iter()
            .enumerate()
            .map(|(i, &b)| (b, i as u32))
            .collect();
        let route = head_routes(src.layout.num_kv_heads, 1, src.layout.num_kv_heads, 1)?;
        copier.copy(&[(*src, kv.pool, route[0])], &pairs)?;
        Ok(kv)
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks
    }

    pub fn layout(&self) -> KvLayout {
        self.pool.layout
    }

    pub fn device(&self) -> usize {
        self.pool.device
    }

    /// Blocks `from..` in the `Backend::export_blocks` wire format (for transports that need bytes).
    pub fn to_host(&self, from: usize) -> Result<Vec<u8>> {
        let blocks: Vec<u32> = (from.min(self.num_blocks())..self.num_blocks())
            .map(|b| b as u32)
            .collect();
        self.staging
            .as_ref()
            .expect("present until drop")
            .read_blocks(&blocks)
    }

    /// Copies staged blocks `from..from + dst_blocks.len()` into `dst_blocks` of the destination
    /// pools (one per tensor-parallel rank, rank `r` holding its share of the heads), then waits.
    /// One copier per destination GPU pulls over peer access, so the copy runs on the destination's
    /// SMs and never queues behind the prefill GPU's work. `copiers` caches them by GPU.
    pub fn copy_into(
        &self,
        copiers: &mut HashMap<usize, CudaKvCopier>,
        from: usize,
        dst_pools: &[CudaKvPool],
        dst_blocks: &[u32],
    ) -> Result<()> {
        ensure!(!dst_pools.is_empty(), "no destination KV pools");
        ensure!(
            from + dst_blocks.len() <= self.num_blocks(),
            "blocks {from}..{} of a staging buffer of {}",
            from + dst_blocks.len(),
            self.num_blocks()
        );
        let src = self.pool;
        let dst_heads = dst_pools[0].layout.num_kv_heads;
        ensure!(
            dst_pools.iter().all(|p| p.layout.num_kv_heads == dst_heads),
            "destination ranks differ in head count"
        );
        let routes = head_routes(src.layout.num_kv_heads, 1, dst_heads, dst_pools.len())?;
        let pairs: Vec<(u32, u32)> = dst_blocks
            .iter()
            .enumerate()
            .map(|(i, &d)| ((from + i) as u32, d))
            .collect();
        for route in routes {
            let dst = dst_pools[route.dst_rank];
            let copier = match copiers.entry(dst.device) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(CudaKvCopier::new(dst.device)?)
                }
            };
            copier.enable_peer(src.device)?;
            copier.copy(&[(src, dst, route)], &pairs)?;
        }
        DEVICE_IMPORTS.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for DeviceKv {
    fn drop(&mut self) {
        // cuMemFree may wait for the whole device (the prefill GPU, mid-step): free it on a thread
        // of its own so neither engine's step thread stalls, nor has its current context changed.
        if let Some(staging) = self.staging.take() {
            let freed = std::thread::Builder::new()
                .name("tandem-kv-free".into())
                .spawn(move || {
                    drop(staging);
                    LIVE.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = freed {
                tracing::warn!("freeing a KV staging buffer on this thread: {e}");
                // The closure (and the buffer) was dropped with the failed spawn.
                LIVE.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}
