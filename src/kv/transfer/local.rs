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
