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
        // A backend whose pool holds only some heads (a TP rank's) exports through the host.
        let pool = self
            .backend
            .cuda_kv_pool()
            .filter(|p| p.layout == self.layout)?;
        let copier = match self.device_kv.copiers.entry(pool.device) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match CudaKvCopier::new(pool.device) {
                Ok(c) => e.insert(c),
                Err(err) => {
                    tracing::warn!(
                        "KV copier on GPU {}: {err:#}; exporting via host",
                        pool.device
                    );
                    return None;
                }
            },
        };
        match DeviceKv::stage(copier, &pool, blocks) {
            Ok(kv) => Some(Arc::new(kv)),
            Err(err) => {
                tracing::warn!(
                    "staging KV on GPU {}: {err:#}; exporting via host",
                    pool.device
                );
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
        match kv.copy_into(&mut self.device_kv.copiers, from, &pools, block_ids) {
            Ok(()) => Ok(()),
            Err(e) => {
                // E.g. GPUs without peer access: the host path still works (it rewrites every block).
                tracing::warn!("device KV import failed ({e:#}); importing through the host");
                let data = kv
                    .to_host(from)
                    .map_err(|e| EngineError::Internal(format!("reading staged KV: {e:#}")))?;
                self.import_kv(request_id, block_ids, &data)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::mock_backend::MockBackend;
    use crate::engine::types::{GenerateRequest, SamplingParams};
    use crate::engine::{Engine, EngineConfig};
    use crate::kv::transfer::KvPayload;

    fn request(id: &str) -> GenerateRequest {
        GenerateRequest {
            id: id.into(),
            prompt_tokens: (1..=10).collect(),
            params: SamplingParams {
                max_tokens: 1,
                ..Default::default()
            },
        }
    }

    /// Without a device pool (mock, CPU) an export asked on the device comes back as the host
    /// bytes `prefill_and_export` gives, and the payload of blocks `1..` is their tail.
    #[tokio::test]
    async fn device_export_without_a_device_pool_gives_host_bytes() {
        let engine = Engine::start(
            Box::new(MockBackend::new(64, 4, 32)),
            None,
            EngineConfig::default(),
        );
        assert!(!engine.has_device_kv());
        let host = engine.prefill_and_export(request("h")).await.unwrap();
        let dev = engine
            .prefill_and_export_on_device(request("d"))
            .await
            .unwrap();
        assert!(dev.device.is_none());
        assert_eq!(dev.num_blocks, 3);
        assert_eq!(dev.first_token, host.first_token);
        assert!(!host.kv.is_empty());
        assert_eq!(dev.kv, host.kv);
        let bb = dev.layout.block_bytes();
        match dev.into_payload(1) {
            KvPayload::Host(bytes) => assert_eq!(bytes, host.kv[bb..].to_vec()),
            other => panic!("expected host bytes, got {other:?}"),
        }
        assert_eq!(engine.metrics().kv_blocks_active, 0);
        engine.shutdown();
    }
}
