//! The in-process transfer: the destination's sink is called directly (one host copy at most, or
//! none: a device payload is handed over as it is).

use super::{check_write, BlockWrite, DeviceWrite, KvEndpoint, KvSink, KvTransfer};
use anyhow::{anyhow, Result};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// A registry of the sinks of this process, keyed by name; cloning shares the registry.
#[derive(Clone, Default)]
pub struct InProcessTransfer {
    sinks: Arc<Mutex<HashMap<String, Arc<dyn KvSink>>>>,
}

/// Keeps a sink registered; dropping it removes the sink.
pub struct SinkRegistration {
    key: String,
    sinks: Weak<Mutex<HashMap<String, Arc<dyn KvSink>>>>,
}

impl Drop for SinkRegistration {
    fn drop(&mut self) {
        if let Some(sinks) = self.sinks.upgrade() {
            sinks.lock().remove(&self.key);
        }
    }
}

impl InProcessTransfer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `sink` under `key`; returns the endpoint to advertise and the registration.
    pub fn register(&self, key: &str, sink: Arc<dyn KvSink>) -> (KvEndpoint, SinkRegistration) {
        self.sinks.lock().insert(key.to_string(), sink);
        let registration = SinkRegistration {
            key: key.to_string(),
            sinks: Arc::downgrade(&self.sinks),
        };
        (
            KvEndpoint::InProcess {
                key: key.to_string(),
            },
            registration,
        )
    }
}

impl KvTransfer for InProcessTransfer {
    fn name(&self) -> &'static str {
        "in-process"
    }

    fn supports(&self, endpoint: &KvEndpoint) -> bool {
        matches!(endpoint, KvEndpoint::InProcess { key } if self.sinks.lock().contains_key(key))
    }

    fn write(&self, endpoint: &KvEndpoint, write: BlockWrite) -> BoxFuture<'static, Result<()>> {
        let sink = match endpoint {
            KvEndpoint::InProcess { key } => self.sinks.lock().get(key).cloned(),
            _ => None,
        };
        Box::pin(async move {
            let sink = sink.ok_or_else(|| anyhow!("in-process KV sink is gone"))?;
            check_write(&sink.rank_layout(), sink.tp(), &write)?;
            sink.write_blocks(write).await
        })
    }

    fn accepts_device(&self, endpoint: &KvEndpoint) -> bool {
        match endpoint {
            KvEndpoint::InProcess { key } => self
                .sinks
                .lock()
                .get(key)
                .is_some_and(|s| s.accepts_device()),
            _ => false,
        }
    }

    /// Hands the staged device KV to the sink unchanged (its engine copies it GPU to GPU).
    fn write_device(
        &self,
        endpoint: &KvEndpoint,
        write: &DeviceWrite,
    ) -> Option<BoxFuture<'static, Result<()>>> {
        let sink = match endpoint {
            KvEndpoint::InProcess { key } => self.sinks.lock().get(key).cloned(),
            _ => None,
        }?;
        sink.write_device(write.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{KvDtype, KvLayout};
    use crate::kv::transfer::{accepts_device, send_payload, KvDestination, KvPayload};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const LAYOUT: KvLayout = KvLayout {
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 4,
        block_size: 2,
        dtype: KvDtype::F32,
    };

    /// Counts host writes; takes device payloads when `device` is set.
    struct Sink {
        device: bool,
        host_writes: AtomicUsize,
    }

    impl KvSink for Sink {
        fn rank_layout(&self) -> KvLayout {
            LAYOUT
        }
        fn tp(&self) -> usize {
            1
        }
        fn accepts_device(&self) -> bool {
            self.device
        }
        fn write_blocks(&self, write: BlockWrite) -> BoxFuture<'static, Result<()>> {
            assert_eq!(write.block_ids, vec![5, 6]);
            self.host_writes.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
    }

    fn dest(key: &str) -> KvDestination {
        KvDestination {
            endpoints: vec![
                KvEndpoint::InProcess { key: key.into() },
                KvEndpoint::Tcp {
                    addr: "127.0.0.1:1".into(),
                },
            ],
            rank_layout: LAYOUT,
            tp: 1,
        }
    }

    #[tokio::test]
    async fn device_payloads_are_offered_only_to_sinks_that_take_them() {
        let registry = InProcessTransfer::new();
        let gpu = Arc::new(Sink {
            device: true,
            host_writes: AtomicUsize::new(0),
        });
        let host = Arc::new(Sink {
            device: false,
            host_writes: AtomicUsize::new(0),
        });
        let (_, _g) = registry.register("gpu", gpu.clone());
        let (_, _h) = registry.register("host", host.clone());
        let transfers: Vec<Arc<dyn KvTransfer>> = vec![Arc::new(registry.clone())];
        assert!(accepts_device(&transfers, &dest("gpu")));
        assert!(!accepts_device(&transfers, &dest("host")));
        assert!(!accepts_device(&transfers, &dest("gone")));
        // Host payloads still go as bytes, whatever the sink takes.
        for (key, sink) in [("gpu", &gpu), ("host", &host)] {
            let payload = KvPayload::Host(vec![0; 2 * LAYOUT.block_bytes()]);
            send_payload(&transfers, &dest(key), "r", &[5, 6, 7], LAYOUT, payload)
                .await
                .unwrap();
            assert_eq!(sink.host_writes.load(Ordering::SeqCst), 1, "{key}");
        }
    }
}
