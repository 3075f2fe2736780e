//! Discovery on etcd: each instance is a key under a lease that it keeps alive; when the process
//! dies the lease expires and the key goes, which every watcher sees.
//!
//! Both sides survive an etcd restart: registration grants a new lease and writes its key again;
//! a watch lists the keys again and reports the difference before it resumes.

use super::{DiscoveryEvent, Instance, Registration};
use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const OP_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_DELAY: Duration = Duration::from_millis(500);

async fn timed<T>(what: &str, f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r.with_context(|| format!("etcd {what}")),
        Err(_) => bail!("etcd {what} timed out"),
    }
}

#[derive(Clone)]
pub struct EtcdDiscovery {
    client: Client,
    prefix: String,
    /// Lease time-to-live in seconds: how long a dead instance stays listed.
    ttl: i64,
}

impl EtcdDiscovery {
    pub async fn connect(endpoints: &[String], namespace: &str, ttl: Duration) -> Result<Self> {
        let options = ConnectOptions::new().with_connect_timeout(OP_TIMEOUT);
        let client = tokio::time::timeout(OP_TIMEOUT, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| anyhow!("connecting to etcd at {endpoints:?} timed out"))?
            .with_context(|| format!("connecting to etcd at {endpoints:?}"))?;
        let mut discovery = Self {
            client,
            prefix: format!("tandem/{namespace}/instances/"),
            ttl: ttl.as_secs().max(1) as i64,
        };
        // Fail now, clearly, if etcd is not there (the client connects lazily).
        let mut c = discovery.client.clone();
        timed("status", c.status()).await?;
        discovery.client = c;
        Ok(discovery)
    }

    /// Grants a lease and writes the instance's key under it; returns the lease id.
    async fn put(&self, key: &str, info: &[u8]) -> Result<i64> {
        let mut client = self.client.clone();
        let lease = timed("lease grant", client.lease_grant(self.ttl, None))
            .await?
            .id();
        timed(
            "put",
            client.put(key, info, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        Ok(lease)
    }

    /// Keeps `lease` alive until cancelled or until it fails.
    async fn keep_alive(&self, lease: i64, cancel: &CancellationToken) -> Result<()> {
        let mut client = self.client.clone();
        let (mut keeper, mut responses) =
            timed("lease keep-alive", client.lease_keep_alive(lease)).await?;
        let period = Duration::from_millis((self.ttl as u64 * 1000 / 3).max(200));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(period) => {}
            }
            timed("keep-alive", keeper.keep_alive()).await?;
            match timed("keep-alive reply", responses.message()).await? {
                Some(r) if r.ttl() > 0 => {}
                _ => bail!("lease {lease:x} expired"),
            }
        }
    }

    pub async fn register(&self, id: &str, info: Vec<u8>) -> Result<Registration> {
        let key = format!("{}{id}", self.prefix);
        let mut lease = self.put(&key, &info).await?;
        let cancel = CancellationToken::new();
        let (this, token) = (self.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                match this.keep_alive(lease, &token).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!("etcd registration of {key}: {e:#}; registering again")
                    }
                }
                // Register again until it works or we are told to stop.
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                    match this.put(&key, &info).await {
                        Ok(l) => {
                            lease = l;
                            tracing::info!("etcd: registered {key} again");
                            break;
                        }
                        Err(e) => tracing::debug!("etcd: registering {key}: {e:#}"),
                    }
                }
                if token.is_cancelled() {
                    break;
                }
            }
            let mut client = this.client.clone();
            let _ = timed("lease revoke", client.lease_revoke(lease)).await;
        });
        Ok(Registration::new(cancel))
    }

    pub async fn watch(&self) -> Result<BoxStream<'static, DiscoveryEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut known = HashMap::new();
        // The first listing happens here, so a missing etcd is an error for the caller.
        let mut revision = self.sync(&mut known, &tx).await?;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.follow(revision, &mut known, &tx).await {
                    tracing::warn!("etcd watch: {e:#}; watching again");
                }
                if tx.is_closed() {
                    return;
                }
                loop {
                    tokio::time::sleep(RETRY_DELAY).await;
                    match this.sync(&mut known, &tx).await {
                        Ok(r) => {
                            revision = r;
                            break;
                        }
                        Err(_) if tx.is_closed() => return,
                        Err(e) => tracing::debug!("etcd listing: {e:#}"),
                    }
                }
            }
        });
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed())
    }

    /// Lists the instances, reports what changed since `known`, and returns the revision read.
    async fn sync(
        &self,
        known: &mut HashMap<String, Vec<u8>>,
        tx: &mpsc::UnboundedSender<DiscoveryEvent>,
    ) -> Result<i64> {
        let mut client = self.client.clone();
        let resp = timed(
            "get",
            client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut now = HashMap::new();
        for kv in resp.kvs() {
            let id = kv.key_str()?.trim_start_matches(&self.prefix).to_string();
            now.insert(id, kv.value().to_vec());
        }
        for id in known.keys().filter(|id| !now.contains_key(*id)) {
            let _ = tx.send(DiscoveryEvent::Down(id.clone()));
        }
        for (id, info) in &now {
            if known.get(id) != Some(info) {
                let _ = tx.send(DiscoveryEvent::Up(Instance {
                    id: id.clone(),
                    info: info.clone(),
                }));
            }
        }
        *known = now;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Follows changes after `revision` until the watch breaks or the receiver is gone.
    async fn follow(
        &self,
        revision: i64,
        known: &mut HashMap<String, Vec<u8>>,
        tx: &mpsc::UnboundedSender<DiscoveryEvent>,
    ) -> Result<()> {
        let mut client = self.client.clone();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let (_watcher, mut stream) =
            timed("watch", client.watch(self.prefix.as_str(), Some(options))).await?;
        loop {
            // The receiver may go away while nothing changes: look now and then.
            let message = tokio::select! {
                m = stream.message() => m?,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if tx.is_closed() { return Ok(()); }
                    continue;
                }
            };
            let Some(resp) = message else {
                bail!("etcd closed the watch")
            };
            if resp.canceled() {
                bail!("etcd cancelled the watch");
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let id = kv.key_str()?.trim_start_matches(&self.prefix).to_string();
                let event = match event.event_type() {
                    EventType::Put => {
                        known.insert(id.clone(), kv.value().to_vec());
                        DiscoveryEvent::Up(Instance {
                            id,
                            info: kv.value().to_vec(),
                        })
                    }
                    EventType::Delete => {
                        known.remove(&id);
                        DiscoveryEvent::Down(id)
                    }
                };
                if tx.send(event).is_err() {
                    return Ok(());
                }
            }
        }
    }
}
