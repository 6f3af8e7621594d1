//! The whole product through HTTP: 3 shard-node processes plus the coordinator, on port 0.
//! Greedy output equals single-process `shard-node generate`; 8 concurrent streams each equal
//! their sequential output; malformed requests get 400; kill -9 of a node mid-stream ends the
//! stream with an error while the coordinator keeps answering /health.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{
    completion, curl_post, default_model, generate, sse_text, CoordinatorProcess, ShardProcess,
};

#[test]
fn cluster_serves_openai_api() -> anyhow::Result<()> {
    let model = default_model();
    let dir = model.parent().ok_or_else(|| anyhow::anyhow!("no folder"))?;
    let mut nodes: Vec<ShardProcess> = (0..3)
        .map(|i| {
            ShardProcess::spawn(
                dir,
                if i == 0 {
                    &["--metrics-listen", "127.0.0.1:0"]
                } else {
                    &[]
                },
            )
        })
        .collect::<Result<_, _>>()?;
    let coord = CoordinatorProcess::spawn(&model, &nodes.iter().collect::<Vec<_>>())?;
    let url = coord.url.clone();

    // Identical to single-process generation.
    let prompt = "The capital of France is";
    let want = generate(&model, prompt, 24)?;
    assert_eq!(completion(&url, prompt, 24, false)?, want);
    assert_eq!(completion(&url, prompt, 24, true)?, want);

    // Chat, streamed.
    let chat = serde_json::json!({"messages": [{"role": "user", "content": "What is 2+2?"}],
                                  "max_tokens": 16, "temperature": 0, "stream": true});
    let (code, body) = curl_post(&format!("{url}/v1/chat/completions"), &chat.to_string())?;
    assert_eq!(code, 200);
    assert!(!sse_text(&body)?.is_empty());

    // 8 concurrent streams, each equal to its sequential output.
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Here is fact number {i} about the ocean:"))
        .collect();
    let sequential: Vec<String> = prompts
        .iter()
        .map(|p| completion(&url, p, 12, true))
        .collect::<anyhow::Result<_>>()?;
    let concurrent = std::thread::scope(|s| -> anyhow::Result<Vec<String>> {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| completion(&url, p, 12, true)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("thread panicked"))
                    .and_then(|r| r)
            })
            .collect()
    })?;
    assert_eq!(concurrent, sequential);

    // The first stage batched those streams' steps: fewer passes than session steps.
    let metrics_url = format!(
        "http://{}/metrics",
        nodes[0].metrics.clone().unwrap_or_default()
    );
    let out = Command::new("curl")
        .args(["-s", "-m", "5", &metrics_url])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let metric = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .ok_or_else(|| anyhow::anyhow!("no {name} in {text}"))?
            .trim()
            .parse()
            .map_err(Into::into)
    };
    let (batches, items) = (
        metric("shard_forward_batches_total")?,
        metric("shard_forward_items_total")?,
    );
    assert!(
        batches > 0 && items > batches,
        "batches {batches}, items {items}"
    );
    let busy: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("shard_forward_seconds_total "))
        .ok_or_else(|| anyhow::anyhow!("no shard_forward_seconds_total in {text}"))?
        .trim()
        .parse()?;
    assert!(busy > 0.0, "compute busy {busy} s after {batches} batches");
    assert_eq!(metric("shard_plan_epoch")?, 1);

    // Malformed requests: 400 with OpenAI's error shape.
    for bad in [
        r#"{"prompt": 5}"#,
        "not json",
        r#"{"prompt":"x","max_tokens":100000}"#,
        r#"{"prompt":"x","temperature":-1}"#,
    ] {
        let (code, body) = curl_post(&format!("{url}/v1/completions"), bad)?;
        assert_eq!(code, 400, "{bad} -> {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    // kill -9 of a node mid-stream: the stream ends with an error event, /health stays up.
    let long = serde_json::json!({"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 400, "temperature": 0, "stream": true});
    let u = format!("{url}/v1/completions");
    let started = Instant::now();
    let (body, ()) = std::thread::scope(|s| {
        let h = s.spawn(|| curl_post(&u, &long.to_string()));
        std::thread::sleep(Duration::from_millis(700));
        nodes[1].kill();
        (h.join(), ())
    });
    let (code, body) = body.map_err(|_| anyhow::anyhow!("thread panicked"))??;
    assert_eq!(code, 200, "the stream had started");
    assert!(
        body.contains("event: error") && body.contains("503"),
        "no error event: {body}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let health = Command::new("curl")
        .args(["-s", "-m", "5", &format!("{url}/health")])
        .output()?;
    assert!(String::from_utf8(health.stdout)?.contains("ok"));
    let (code, body) = curl_post(&u, r#"{"prompt":"hi","max_tokens":4}"#)?;
    assert_eq!(code, 503, "a request while a stage is down: {body}");

    // The node comes back on its address: the coordinator reconnects, reloads its slice and
    // serves again, with the same output.
    let addr = nodes[1].addr.clone();
    nodes[1] = ShardProcess::spawn_at(&addr, dir, &[])?;
    let back = Instant::now();
    loop {
        match completion(&url, prompt, 24, false) {
            Ok(text) => {
                assert_eq!(text, want);
                break;
            }
            Err(e) => assert!(
                back.elapsed() < Duration::from_secs(30),
                "not serving 30 s after the node came back: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}
