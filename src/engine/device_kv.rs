//! KV that stays on the GPU between two CUDA engines of one process: a prefill engine stages a
//! finished prompt's blocks on its device (`prefill_and_export_on_device`), the decode engine's step
//! thread copies them into the parked request's blocks (`import_kv_device`). Both copies are one
//! `kv_copy_blocks` launch each (`kv::transfer::cuda`), instead of thousands of small host copies.

use crate::engine::core::Core;
use crate::engine::sequence::SeqId;
use crate::engine::types::EngineError;
use crate::kv::transfer::cuda::{CudaKvCopier, DeviceKv};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

#[derive(Default)]
pub struct DeviceKvState {
    /// One copier per GPU used, made on first use.
    pub copiers: HashMap<usize, CudaKvCopier>,
    /// Prefill-only sequences whose KV is wanted on the device.
    pub exports: HashSet<SeqId>,
}

impl Core {
    /// Stages `blocks` on this engine's GPU; `None` (the caller exports host bytes) when the
    /// backend has no device pool or staging fails (e.g. no memory for it).
    pub(crate) fn stage_on_device(&mut self, blocks: &[u32]) -> Option<Arc<DeviceKv>> {
        let pool = self.backend.cuda_kv_pool()?;
        let copier = match self.device_kv.copiers.entry(pool.device) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match CudaKvCopier::new(pool.device) {
                Ok(c) => e.insert(c),
                Err(err) => {
                    tracing::warn!("KV copier on GPU {}: {err:#}; exporting via host", pool.device);
                    return None;
                }
            },
        };
        match DeviceKv::stage(copier, &pool, blocks) {
            Ok(kv) => Some(Arc::new(kv)),
            Err(err) => {
                tracing::warn!("staging KV on GPU {}: {err:#}; exporting via host", pool.device);
                None
            }
        }
    }

    /// Copies staged blocks `from..` into `block_ids` of a request still parked for them.
    pub(crate) fn import_kv_device(
        &mut self,
        request_id: &str,
        block_ids: &[u32],
        kv: &DeviceKv,
        from: usize,
    ) -> Result<(), EngineError> {
        self.check_import(request_id, block_ids)?;
        if from + block_ids.len() != kv.num_blocks() {
            return Err(EngineError::InvalidRequest(format!(
                "{} destination blocks for staged blocks {from}..{}",
                block_ids.len(),
                kv.num_blocks()
            )));
        }
        if kv.layout() != self.layout {
            return Err(EngineError::InvalidRequest(format!(
                "staged KV layout {:?} differs from the engine's {:?}",
                kv.layout(),
                self.layout
            )));
        }
        let pools = self.backend.cuda_kv_pools();
        if pools.is_empty() {
            // No device pool here: bring the bytes over the host (slow; a mixed deployment).
            let data = kv
                .to_host(from)
                .map_err(|e| EngineError::Internal(format!("reading staged KV: {e:#}")))?;
            return self.import_kv(request_id, block_ids, &data);
        }
        kv.copy_into(&mut self.device_kv.copiers, from, &pools, block_ids)
            .map_err(|e| EngineError::Internal(format!("device KV import failed: {e:#}")))
    }
}
