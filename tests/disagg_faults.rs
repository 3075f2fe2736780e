//! Faults in a distributed deployment of `tandem worker` processes: a prefill worker killed with
//! `kill -9` under load, a decode worker killed mid-stream, etcd and NATS restarting.

mod disagg_support;

use disagg_support::*;
use futures::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::engine::types::EngineError;
use tandem::worker::remote::{RemoteWorker, WorkerDirectory};
use tandem::worker::WorkerClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_prefill_worker_under_load_loses_no_request_and_leaks_no_block() {
    let Some(servers) = start_servers() else {
        return;
    };
    let ns = "kill-prefill";
    // A small step budget makes the prefill take a while, so the kill lands mid-work. The
    // decode side's remote-prefill timeout is long: the requests must complete by redelivery.
    let slow = ["--max-num-batched-tokens", "128", "--prefill-ack-wait", "2"];
    let mut first = spawn_worker(&servers, ns, "prefill", "prefill-a", &slow);
    let _decode = spawn_worker(
        &servers,
        ns,
        "decode",
        "decode-0",
        &["--no-conditional-disagg", "--remote-prefill-timeout", "60"],
    );
    let rt = connect(&servers, ns).await;
    wait_registered(&rt, &["prefill-a", "decode-0"]).await;

    let n = 16;
    let cases: Vec<_> = (0..n)
        .map(|i| request(&format!("k{i}"), prompt(i, 700 + 40 * i), 4))
        .collect();
    let reference = tandem::worker::LocalWorker::new("reference", reference_engine());
    let mut wants = Vec::new();
    for req in &cases {
        wants.push(tokens_of(&reference, req.clone()).await);
    }

    let decode = Arc::new(RemoteWorker::connect(rt.clone(), "decode-0").await.unwrap());
    let done = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let runs: Vec<_> = cases
        .iter()
        .cloned()
        .map(|req| {
            let (decode, done) = (decode.clone(), done.clone());
            tokio::spawn(async move {
                let mut stream = decode.generate(req).await.expect("accepted");
                let mut tokens = Vec::new();
                while let Some(piece) = tokio::time::timeout(Duration::from_secs(50), stream.next())
                    .await
                    .expect("stalled")
                {
                    tokens.extend(piece.expect("no error").token_ids);
                }
                done.fetch_add(1, Ordering::SeqCst);
                tokens
            })
        })
        .collect();
    // Kill the prefill worker once it is demonstrably working, with work left.
    while done.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "nothing completed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill();
    let completed_at_kill = done.load(Ordering::SeqCst);
    eprintln!(
        "killed prefill-a after {:?} with {completed_at_kill}/{n} done",
        t0.elapsed()
    );
    assert!(
        completed_at_kill < n,
        "everything finished before the kill; the test proves nothing"
    );
    let _second = spawn_worker(
        &servers,
        ns,
        "prefill",
        "prefill-b",
        &["--prefill-ack-wait", "2"],
    );

    for (i, (run, want)) in runs.into_iter().zip(wants).enumerate() {
        assert_eq!(run.await.unwrap(), want, "request {i}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(50),
        "completed only by the decode side's timeout"
    );
    wait_no_active_blocks(&decode).await;
    let survivor = RemoteWorker::connect(rt.clone(), "prefill-b")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        survivor.metrics().steps > 0,
        "the second prefill worker did nothing"
    );
    wait_no_active_blocks(&survivor).await;
    // Nothing is left in the queue.
    assert_eq!(
        rt.queue_len(tandem::worker::protocol::PREFILL_QUEUE)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_decode_worker_fails_its_streams_fast_and_leaves_the_directory() {
    let Some(mut servers) = start_servers() else {
        return;
    };
    let ns = "kill-decode";
    let mut doomed = spawn_worker(&servers, ns, "decode", "decode-doomed", &[]);
    let _steady = spawn_worker(&servers, ns, "decode", "decode-steady", &[]);
    let rt = connect(&servers, ns).await;
    let directory = WorkerDirectory::watch(rt.clone()).await.unwrap();
    directory
        .wait_for(2, Duration::from_secs(60))
        .await
        .unwrap();
    let mut args: Vec<String> = [
        "frontend",
        "--namespace",
        ns,
        "--model",
        MODEL,
        "--served-model-name",
        "tiny-llama",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(
        [
            "--etcd",
            &servers.etcd_url,
            "--nats",
            &servers.nats_url,
            "--port",
            "0",
        ]
        .map(String::from),
    );
    args.extend(["--router-mode", "least-loaded", "--block-size", "16"].map(String::from));
    let frontend = Proc::spawn("frontend", &args);

    let doomed_client = directory
        .workers()
        .into_iter()
        .find(|w| w.id() == "decode-doomed")
        .unwrap();
    let mut stream = doomed_client
        .generate(request("long", prompt(1, 30), 1800))
        .await
        .unwrap();
    stream.next().await.unwrap().unwrap();
    doomed.kill();
    let killed = Instant::now();
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the stream hung")
        {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the stream ended normally after its worker died"),
        }
    };
    assert!(
        matches!(outcome, EngineError::Unavailable(_)),
        "{outcome:?}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "error after {:?}",
        killed.elapsed()
    );

    // Its lease expires and it leaves the directory; the other one serves.
    let t0 = Instant::now();
    while directory
        .workers()
        .iter()
        .any(|w| w.id() == "decode-doomed")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the dead worker stayed listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let workers = directory.workers();
    assert_eq!(
        workers
            .iter()
            .map(|w| w.id().to_string())
            .collect::<Vec<_>>(),
        ["decode-steady"]
    );
    assert_eq!(
        tokens_of(workers[0].as_ref(), request("after", prompt(2, 30), 5))
            .await
            .len(),
        5
    );
    // Through the frontend too: every request lands on the live worker, promptly.
    let url = frontend_url(&frontend);
    let t0 = Instant::now();
    for i in 0..4 {
        let body =
            serde_json::json!({"model": "tiny-llama", "prompt": prompt(i, 20), "max_tokens": 4});
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "slow after the death: {:?}",
        t0.elapsed()
    );

    // etcd and NATS restart: the worker registers again and serves again.
    servers.etcd.restart();
    servers.nats.restart();
    let t0 = Instant::now();
    loop {
        let listed = directory
            .workers()
            .into_iter()
            .find(|w| w.id() == "decode-steady");
        let served = match listed {
            Some(w) => match w.generate(request("restart", prompt(3, 30), 5)).await {
                Ok(s) => s.collect::<Vec<_>>().await.iter().all(|p| p.is_ok()),
                Err(_) => false,
            },
            None => false,
        };
        if served {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the worker did not come back after the restarts"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
