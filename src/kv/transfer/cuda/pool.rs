//! Pools as the copy sees them: standalone pools (tests, benchmarks, a decode process's export),
//! CUDA IPC handles of pools, and host read-back in the wire format.

use super::plan;
use crate::backend::cuda::device::DeviceBuffer;
use crate::backend::{CudaKvPool, KvLayout};
use anyhow::{ensure, Context, Result};
use cudarc::driver::{result, sys, CudaContext};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A pool of another process, as its owner advertises it: the IPC handle of the allocation and
/// where it lives. Opening it maps the same device memory into this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaIpcPool {
    /// `CUipcMemHandle`, 64 bytes.
    pub handle: Vec<u8>,
    /// The GPU's UUID (ordinals differ between processes under `CUDA_VISIBLE_DEVICES`).
    pub device_uuid: String,
    pub bytes: usize,
    pub num_blocks: usize,
    pub layout: KvLayout,
}

/// The UUID of GPU `ordinal`, as hex.
pub fn device_uuid(ordinal: usize) -> Result<String> {
    let dev = result::device::get(ordinal as i32)?;
    let uuid = result::device::get_uuid(dev)?;
    Ok(uuid
        .bytes
        .iter()
        .map(|b| format!("{:02x}", *b as u8))
        .collect())
}

/// The ordinal of the GPU with this UUID, if this process sees it.
pub fn device_by_uuid(uuid: &str) -> Result<Option<usize>> {
    result::init()?;
    for i in 0..result::device::get_count()? as usize {
        if device_uuid(i)? == uuid {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// The IPC handle of `pool`, whose base must be the start of a `cuMemAlloc` allocation (the CUDA
/// backend's pool is).
pub fn export_ipc(pool: &CudaKvPool) -> Result<CudaIpcPool> {
    let ctx = CudaContext::new(pool.device)?;
    ctx.bind_to_thread()?;
    let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
    // SAFETY: `pool.base` is a live device allocation of this process.
    unsafe { sys::cuIpcGetMemHandle(&mut handle, pool.base) }
        .result()
        .context("cuIpcGetMemHandle on the KV pool")?;
    Ok(CudaIpcPool {
        handle: handle.reserved.iter().map(|&c| c as u8).collect(),
        device_uuid: device_uuid(pool.device)?,
        bytes: pool.bytes,
        num_blocks: pool.num_blocks,
        layout: pool.layout,
    })
}

/// Reads `blocks` of a pool this process can address (own, peer, or IPC-mapped) into host memory
/// in the `Backend::export_blocks` wire format (checks and benchmarks; not a fast path).
pub fn read_blocks(pool: &CudaKvPool, blocks: &[u32]) -> Result<Vec<u8>> {
    let l = pool.layout;
    let strides = plan::PoolStrides::of(&l, pool.num_blocks);
    let mut out = vec![0u8; blocks.len() * l.block_bytes()];
    let mut runs = out.chunks_mut(strides.block);
    for &b in blocks {
        ensure!((b as usize) < pool.num_blocks, "block {b} out of range");
        for layer in 0..l.num_layers {
            for kv in 0..2 {
                let at = pool.base + strides.offset(layer, kv, b as usize, 0) as u64;
                let run = runs.next().expect("sized above");
                // SAFETY: inside the pool (checked block id, layout strides).
                unsafe { result::memcpy_dtoh_sync(run, at) }?;
            }
        }
    }
    Ok(out)
}

/// A KV pool of its own (`cuMemAlloc`), laid out as the CUDA backend's: a destination for
/// benchmarks and tests, or what a decode process exports with [`export_ipc`].
pub struct OwnedKvPool {
    buf: DeviceBuffer,
    pool: CudaKvPool,
    ctx: Arc<CudaContext>,
}

impl OwnedKvPool {
    pub fn new(device: usize, layout: KvLayout, num_blocks: usize) -> Result<Self> {
        let ctx = CudaContext::new(device)?;
        ctx.bind_to_thread()?;
        let bytes = num_blocks * layout.block_bytes();
        let buf = DeviceBuffer::new(bytes)?;
        let pool = CudaKvPool {
            device,
            base: buf.ptr,
            bytes,
            num_blocks,
            layout,
        };
        Ok(Self { buf, pool, ctx })
    }

    pub fn pool(&self) -> CudaKvPool {
        self.pool
    }

    /// Sets every byte (tests poison with 0xEE).
    pub fn fill(&self, byte: u8) -> Result<()> {
        self.ctx.bind_to_thread()?;
        // SAFETY: the whole buffer is ours.
        unsafe { result::memset_d8_sync(self.buf.ptr, byte, self.pool.bytes) }?;
        Ok(())
    }

    /// Overwrites the whole pool with `data` (its raw layout, not the wire format).
    pub fn upload(&self, data: &[u8]) -> Result<()> {
        ensure!(
            data.len() == self.pool.bytes,
            "upload of {} bytes into a {}-byte pool",
            data.len(),
            self.pool.bytes
        );
        self.ctx.bind_to_thread()?;
        // SAFETY: sizes checked.
        unsafe { result::memcpy_htod_sync(self.buf.ptr, data) }?;
        Ok(())
    }

    /// The whole pool, raw.
    pub fn download(&self) -> Result<Vec<u8>> {
        self.ctx.bind_to_thread()?;
        let mut out = vec![0u8; self.pool.bytes];
        // SAFETY: sizes match.
        unsafe { result::memcpy_dtoh_sync(&mut out, self.buf.ptr) }?;
        Ok(out)
    }

    pub fn read_blocks(&self, blocks: &[u32]) -> Result<Vec<u8>> {
        self.ctx.bind_to_thread()?;
        read_blocks(&self.pool, blocks)
    }
}

impl Drop for OwnedKvPool {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
    }
}
