//! The runtime of a deployment across processes: etcd for discovery, NATS for everything else.

use super::etcd::EtcdDiscovery;
use super::nats::NatsMessaging;
use super::{DiscoveryEvent, IncomingRequest, QueueMessage, Registration, ResponseStream, Runtime};
use anyhow::Result;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct DistributedConfig {
    /// etcd endpoints, e.g. `http://127.0.0.1:2379`.
    pub etcd: Vec<String>,
    /// NATS server, e.g. `nats://127.0.0.1:4222`.
    pub nats: String,
    /// Separates deployments that share the servers.
    pub namespace: String,
    /// How long a dead instance stays listed in etcd.
    pub lease_ttl: Duration,
    /// How long a work-queue message may stay unacknowledged before it is delivered again.
    pub ack_wait: Duration,
}

impl DistributedConfig {
    pub fn new(etcd: &str, nats: &str) -> Self {
        Self {
            etcd: etcd.split(',').map(str::to_string).collect(),
            nats: nats.to_string(),
            namespace: "default".into(),
            lease_ttl: Duration::from_secs(3),
            ack_wait: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
pub struct DistributedRuntime {
    discovery: EtcdDiscovery,
    messaging: NatsMessaging,
}

impl DistributedRuntime {
    pub async fn connect(config: &DistributedConfig) -> Result<Self> {
        let discovery =
            EtcdDiscovery::connect(&config.etcd, &config.namespace, config.lease_ttl).await?;
        let messaging =
            NatsMessaging::connect(&config.nats, &config.namespace, config.ack_wait).await?;
        Ok(Self {
            discovery,
            messaging,
        })
    }
}

impl Runtime for DistributedRuntime {
    fn register(&self, id: &str, info: Vec<u8>) -> BoxFuture<'_, Result<Registration>> {
        let id = id.to_string();
        Box::pin(async move { self.discovery.register(&id, info).await })
    }
    fn watch(&self) -> BoxFuture<'_, Result<BoxStream<'static, DiscoveryEvent>>> {
        Box::pin(self.discovery.watch())
    }
    fn serve(&self, subject: &str) -> BoxFuture<'_, Result<BoxStream<'static, IncomingRequest>>> {
        let subject = subject.to_string();
        Box::pin(async move { self.messaging.serve(&subject).await })
    }
    fn request(&self, subject: &str, payload: Vec<u8>) -> BoxFuture<'_, Result<ResponseStream>> {
        let subject = subject.to_string();
        Box::pin(async move { self.messaging.request(&subject, payload).await })
    }
    fn publish(&self, subject: &str, payload: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        let subject = subject.to_string();
        Box::pin(async move { self.messaging.publish(&subject, payload).await })
    }
    fn subscribe(&self, subject: &str) -> BoxFuture<'_, Result<BoxStream<'static, Vec<u8>>>> {
        let subject = subject.to_string();
        Box::pin(async move { self.messaging.subscribe(&subject).await })
    }
    fn queue_push(&self, queue: &str, payload: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        let queue = queue.to_string();
        Box::pin(async move { self.messaging.queue_push(&queue, payload).await })
    }
    fn queue_pop(
        &self,
        queue: &str,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Option<QueueMessage>>> {
        let queue = queue.to_string();
        Box::pin(async move { self.messaging.queue_pop(&queue, wait).await })
    }
    fn queue_len(&self, queue: &str) -> BoxFuture<'_, Result<usize>> {
        let queue = queue.to_string();
        Box::pin(async move { self.messaging.queue_len(&queue).await })
    }
}
