//! `tandem worker` processes on etcd + NATS with the tiny CPU model: remote prefill gives the
//! tokens of an aggregated engine, also when the KV is cut for a TP2 destination.

mod disagg_support;

use disagg_support::*;
use std::time::Duration;
use tandem::engine::types::GenerateRequest;
use tandem::worker::remote::RemoteWorker;
use tandem::worker::WorkerClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_greedy_tokens_equal_aggregated_tp1_and_tp_mismatched() {
    let Some(servers) = start_servers() else {
        return;
    };
    let ns = "same-tokens";
    let _prefill = spawn_worker(&servers, ns, "prefill", "prefill-0", &[]);
    let _tp1 = spawn_worker(
        &servers,
        ns,
        "decode",
        "decode-tp1",
        &["--no-conditional-disagg"],
    );
    let _tp2 = spawn_worker(
        &servers,
        ns,
        "decode",
        "decode-tp2",
        &["--no-conditional-disagg", "--kv-ranks", "2"],
    );
    let rt = connect(&servers, ns).await;
    wait_registered(&rt, &["prefill-0", "decode-tp1", "decode-tp2"]).await;

    let reference = tandem::worker::LocalWorker::new("reference", reference_engine());
    let cases: Vec<(GenerateRequest, Vec<u32>)> = futures::future::join_all((0..6).map(|i| {
        let req = request(&format!("r{i}"), prompt(i, 20 + 57 * i), 12);
        let reference = reference.clone();
        async move {
            let want = tokens_of(&reference, req.clone()).await;
            (req, want)
        }
    }))
    .await;
    assert!(cases.iter().all(|(_, want)| want.len() == 12));

    let prefill = RemoteWorker::connect(rt.clone(), "prefill-0")
        .await
        .unwrap();
    for id in ["decode-tp1", "decode-tp2"] {
        let worker = RemoteWorker::connect(rt.clone(), id).await.unwrap();
        let steps_before = {
            tokio::time::sleep(Duration::from_millis(400)).await;
            prefill.metrics().steps
        };
        let runs = cases.iter().map(|(req, want)| {
            let worker = &worker;
            let req = GenerateRequest {
                id: format!("{id}-{}", req.id),
                ..req.clone()
            };
            async move { (tokens_of(worker, req).await, want.clone()) }
        });
        for (i, (got, want)) in futures::future::join_all(runs)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(got, want, "{id}, request {i}");
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            prefill.metrics().steps > steps_before,
            "{id}: the prefill worker computed nothing"
        );
        wait_no_active_blocks(&worker).await;
    }
    wait_no_active_blocks(&prefill).await;
}
