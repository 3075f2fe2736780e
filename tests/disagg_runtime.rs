//! The runtime's services, in-process and on real etcd + NATS servers (started on free ports),
//! including a restart of each server.

mod disagg_support;

use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tandem::runtime::distributed::{DistributedConfig, DistributedRuntime};
use tandem::runtime::local::LocalRuntime;
use tandem::runtime::{DiscoveryEvent, Runtime};

const WAIT: Duration = Duration::from_secs(10);

async fn next_event(
    events: &mut futures::stream::BoxStream<'static, DiscoveryEvent>,
) -> DiscoveryEvent {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("no discovery event in time")
        .expect("watch ended")
}

/// Skips heartbeats of other instances until an event about `id` arrives.
async fn event_for(
    events: &mut futures::stream::BoxStream<'static, DiscoveryEvent>,
    id: &str,
) -> DiscoveryEvent {
    loop {
        let e = next_event(events).await;
        let about = match &e {
            DiscoveryEvent::Up(i) => i.id == id,
            DiscoveryEvent::Down(d) => d == id,
        };
        if about {
            return e;
        }
    }
}

async fn discovery(rt: Arc<dyn Runtime>) {
    let a = rt
        .register("worker-a", b"{\"role\":\"decode\"}".to_vec())
        .await
        .unwrap();
    let mut events = rt.watch().await.unwrap();
    match event_for(&mut events, "worker-a").await {
        DiscoveryEvent::Up(i) => assert_eq!(i.info, b"{\"role\":\"decode\"}"),
        e => panic!("expected worker-a up, got {e:?}"),
    }
    let _b = rt.register("worker-b", b"b".to_vec()).await.unwrap();
    assert!(matches!(
        event_for(&mut events, "worker-b").await,
        DiscoveryEvent::Up(_)
    ));
    drop(a);
    assert_eq!(
        event_for(&mut events, "worker-a").await,
        DiscoveryEvent::Down("worker-a".into())
    );
}

async fn streaming_requests(rt: Arc<dyn Runtime>) {
    let mut incoming = rt.serve("count").await.unwrap();
    let (cancelled_tx, mut cancelled_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(req) = incoming.next().await {
            let cancelled_tx = cancelled_tx.clone();
            tokio::spawn(async move {
                let n: usize = String::from_utf8(req.payload.clone())
                    .unwrap()
                    .parse()
                    .unwrap();
                for i in 0..n {
                    if req
                        .responder
                        .send(i.to_string().into_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if n == 1000 {
                    // The endless one: wait to be cancelled.
                    let token = req.responder.cancellation();
                    if tokio::time::timeout(WAIT, token.cancelled()).await.is_ok() {
                        cancelled_tx.send(()).unwrap();
                    }
                    return;
                }
                if n == 7 {
                    req.responder.fail("seven is unlucky".into()).await;
                } else {
                    req.responder.end().await;
                }
            });
        }
    });
    let chunks: Vec<String> = rt
        .request("count", b"3".to_vec())
        .await
        .unwrap()
        .map(|c| String::from_utf8(c.unwrap()).unwrap())
        .collect()
        .await;
    assert_eq!(chunks, ["0", "1", "2"]);

    let results: Vec<_> = rt
        .request("count", b"7".to_vec())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(results.len(), 8);
    assert!(results[7]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("unlucky"));

    // A client that drops its stream cancels the request on the server.
    let mut endless = rt.request("count", b"1000".to_vec()).await.unwrap();
    assert_eq!(endless.next().await.unwrap().unwrap(), b"0");
    drop(endless);
    tokio::time::timeout(WAIT, cancelled_rx.recv())
        .await
        .expect("server never saw the cancellation");

    // Nobody serves this subject: an error, in bounded time.
    let t0 = std::time::Instant::now();
    let outcome = match rt.request("nobody", b"x".to_vec()).await {
        Err(e) => Err(e),
        Ok(mut s) => s.next().await.unwrap(),
    };
    assert!(outcome.is_err());
    assert!(t0.elapsed() < Duration::from_secs(8));
}

async fn notifications(rt: Arc<dyn Runtime>) {
    let mut sub = rt.subscribe("kv_ready.d1").await.unwrap();
    rt.publish("kv_ready.d2", b"other".to_vec()).await.unwrap();
    rt.publish("kv_ready.d1", b"mine".to_vec()).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap(),
        b"mine"
    );
}

async fn work_queue(rt: Arc<dyn Runtime>, queue: &str) {
    rt.queue_push(queue, b"job-1".to_vec()).await.unwrap();
    rt.queue_push(queue, b"job-2".to_vec()).await.unwrap();
    assert_eq!(rt.queue_len(queue).await.unwrap(), 2);
    let first = rt.queue_pop(queue, WAIT).await.unwrap().expect("job-1");
    assert_eq!(
        (first.payload.as_slice(), first.delivery),
        (b"job-1".as_slice(), 1)
    );
    // Taken but not acknowledged: dropped (its consumer "died"), so it comes back.
    drop(first);
    // job-1 comes back (at once in-process, after the ack wait on JetStream), job-2 is there.
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = rt.queue_pop(queue, WAIT).await.unwrap().expect("a job");
        got.push((String::from_utf8(m.payload.clone()).unwrap(), m.delivery));
        m.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(got, [("job-1".to_string(), 2), ("job-2".to_string(), 1)]);
    assert!(rt
        .queue_pop(queue, Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());
    assert_eq!(rt.queue_len(queue).await.unwrap(), 0);
}

#[tokio::test]
async fn local_runtime_services() {
    let rt: Arc<dyn Runtime> = Arc::new(LocalRuntime::new());
    discovery(rt.clone()).await;
    streaming_requests(rt.clone()).await;
    notifications(rt.clone()).await;
    work_queue(rt, "prefill").await;
}

fn config(servers: &disagg_support::Servers) -> DistributedConfig {
    DistributedConfig {
        lease_ttl: Duration::from_secs(2),
        ack_wait: Duration::from_secs(1),
        ..DistributedConfig::new(&servers.etcd_url, &servers.nats_url)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_runtime_services_and_server_restarts() {
    let Some(mut servers) = disagg_support::start_servers() else {
        return;
    };
    let rt: Arc<dyn Runtime> = Arc::new(
        DistributedRuntime::connect(&config(&servers))
            .await
            .unwrap(),
    );
    discovery(rt.clone()).await;
    streaming_requests(rt.clone()).await;
    notifications(rt.clone()).await;
    work_queue(rt.clone(), "prefill").await;

    // etcd restarts: the registration comes back (same data dir) or is written again, and the
    // watch carries on.
    let _reg = rt.register("survivor", b"s".to_vec()).await.unwrap();
    let mut events = rt.watch().await.unwrap();
    assert!(matches!(
        event_for(&mut events, "survivor").await,
        DiscoveryEvent::Up(_)
    ));
    servers.etcd.restart();
    let _late = rt.register("late", b"l".to_vec()).await.unwrap();
    assert!(matches!(
        event_for(&mut events, "late").await,
        DiscoveryEvent::Up(_)
    ));
    tokio::time::sleep(Duration::from_secs(3)).await; // longer than the lease TTL
    let mut fresh = rt.watch().await.unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(DiscoveryEvent::Up(i))) =
        tokio::time::timeout(Duration::from_millis(500), fresh.next()).await
    {
        seen.push(i.id);
    }
    assert!(
        seen.contains(&"survivor".to_string()) && seen.contains(&"late".to_string()),
        "{seen:?}"
    );

    // NATS restarts (same JetStream dir): requests and the queue work again.
    servers.nats.restart();
    let t0 = std::time::Instant::now();
    loop {
        let ok = async {
            rt.queue_push("after", b"x".to_vec()).await?;
            let m = rt
                .queue_pop("after", Duration::from_secs(1))
                .await?
                .ok_or_else(|| anyhow::anyhow!("empty"))?;
            m.ack().await
        }
        .await;
        match ok {
            Ok(()) => break,
            Err(e) => assert!(
                t0.elapsed() < WAIT,
                "queue did not recover after a NATS restart: {e:#}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    streaming_requests_after_restart(rt.clone()).await;
}

async fn streaming_requests_after_restart(rt: Arc<dyn Runtime>) {
    let mut incoming = rt.serve("echo").await.unwrap();
    tokio::spawn(async move {
        while let Some(req) = incoming.next().await {
            let _ = req.responder.send(req.payload.clone()).await;
            req.responder.end().await;
        }
    });
    let got: Vec<_> = rt
        .request("echo", b"hi".to_vec())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].as_ref().unwrap(), b"hi");
}
