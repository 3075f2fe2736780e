//! The KV pool seen from outside a step: host export/import in the wire format of
//! [`crate::backend::Backend::export_blocks`], and the device pool for GPU-to-GPU transfers.

use super::CudaBackend;
use crate::backend::Backend;
use anyhow::{ensure, Result};

impl CudaBackend {
    /// [`Backend::export_blocks`]: one device-to-host copy per block, layer and K/V.
    pub(super) fn export_to_host(&mut self, blocks: &[u32]) -> Result<Vec<u8>> {
        self.gpu.bind()?;
        let part = self.block_part_bytes();
        let layers = self.config.num_hidden_layers;
        let mut out = vec![0u8; blocks.len() * layers * 2 * part];
        for (i, &b) in blocks.iter().enumerate() {
            ensure!(
                (b as usize) < self.num_blocks,
                "block {b} out of range ({} blocks)",
                self.num_blocks
            );
            for l in 0..layers {
                for (j, base) in [self.k_cache(l), self.v_cache(l)].into_iter().enumerate() {
                    let at = ((i * layers + l) * 2 + j) * part;
                    let src = base + (b as usize * part) as u64;
                    self.gpu.copy_from_ptr(src, &mut out[at..at + part], part)?;
                }
            }
        }
        Ok(out)
    }

    /// [`Backend::import_blocks`].
    pub(super) fn import_from_host(&mut self, blocks: &[u32], data: &[u8]) -> Result<()> {
        self.gpu.bind()?;
        let part = self.block_part_bytes();
        let layers = self.config.num_hidden_layers;
        ensure!(
            data.len() == blocks.len() * layers * 2 * part,
            "KV import of {} bytes, expected {}",
            data.len(),
            blocks.len() * layers * 2 * part
        );
        for (i, &b) in blocks.iter().enumerate() {
            ensure!(
                (b as usize) < self.num_blocks,
                "block {b} out of range ({} blocks)",
                self.num_blocks
            );
            for l in 0..layers {
                for (j, base) in [self.k_cache(l), self.v_cache(l)].into_iter().enumerate() {
                    let at = ((i * layers + l) * 2 + j) * part;
                    let offset = (base - self.kv.ptr) as usize + b as usize * part;
                    self.gpu.copy_to(&self.kv, offset, &data[at..at + part])?;
                }
            }
        }
        Ok(())
    }
}

/// A callback run while a step's kernels are being queued, right after layer `layer`'s KV write was
/// queued on `stream` (the backend's stream, context current): a transfer can record an event
/// there and copy that layer's KV on its own stream while the next layers compute.
pub type LayerKvHook = Box<dyn FnMut(usize, cudarc::driver::sys::CUstream) -> Result<()> + Send>;

/// Device-to-device KV transfers (`kv::transfer::cuda`).
impl CudaBackend {
    /// The KV pool: one `cuMemAlloc` buffer, per layer K then V, `[num_blocks, kv_heads, block, dim]`.
    pub fn kv_pool(&self) -> crate::backend::CudaKvPool {
        crate::backend::CudaKvPool {
            device: self.opts.device,
            base: self.kv.ptr,
            bytes: self.kv.bytes,
            num_blocks: self.num_blocks,
            layout: self.kv_layout(),
        }
    }

    /// Installs (or removes) the per-layer KV hook of later steps.
    pub fn set_layer_kv_hook(&mut self, hook: Option<LayerKvHook>) {
        self.layer_kv_hook = hook;
    }

    /// Waits for everything queued on the backend's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.gpu.bind()?;
        self.gpu.sync()
    }
}
