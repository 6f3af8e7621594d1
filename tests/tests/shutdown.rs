//! `coordinator serve` on SIGTERM: it stops taking connections, lets the request in flight
//! finish within the drain period (its leases on the nodes live on meanwhile: the stream runs
//! several lease TTLs past the signal), closes that request's sessions on every node, and
//! exits 0.

use std::time::{Duration, Instant};

use integration_tests::{
    default_model, node_status, post, sse_text, CoordinatorProcess, ShardProcess,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_request_in_flight_then_exits() -> anyhow::Result<()> {
    let model = default_model();
    let dir = model.parent().ok_or_else(|| anyhow::anyhow!("no folder"))?;
    let nodes: Vec<ShardProcess> = (0..2)
        .map(|_| ShardProcess::spawn(dir, &["--lease-ttl-ms", "1000", "--heartbeat-ms", "200"]))
        .collect::<Result<_, _>>()?;
    let mut coord = CoordinatorProcess::spawn(&model, &nodes.iter().collect::<Vec<_>>())?;
    let url = format!("{}/v1/completions", coord.url);
    let body = serde_json::json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 400,
                                  "temperature": 0, "ignore_eos": true, "stream": true});
    let stream = std::thread::spawn({
        let (url, body) = (url.clone(), body.to_string());
        move || post(&url, &body)
    });
    // the stream is running: some of its tokens are out
    tokio::time::sleep(Duration::from_millis(400)).await;
    let signalled = Instant::now();
    coord.terminate()?;
    let (code, text) = stream
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))??;
    assert_eq!(code, 200);
    assert!(text.contains("[DONE]"), "the stream was cut: {text}");
    assert!(!sse_text(&text)?.is_empty());
    let status = coord
        .wait_exit(Duration::from_secs(30))?
        .ok_or_else(|| anyhow::anyhow!("still running 30 s after SIGTERM"))?;
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(30));
    // the finished request's sessions were closed on every node before the exit
    for n in &nodes {
        assert_eq!(node_status(&n.addr).await?.sessions, 0, "{}", n.addr);
    }
    // and nothing listens any more
    assert!(post(&url, r#"{"prompt":"hi","max_tokens":2}"#).is_err());
    Ok(())
}
