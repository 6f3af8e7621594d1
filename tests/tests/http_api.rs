//! The whole product through HTTP: 3 shard-node processes plus the coordinator, on port 0,
//! one cluster per behaviour (the clusters run one at a time: the machine has few cores).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use integration_tests::{
    all_at_once, completion, default_model, generate, get, metric, post, sse_text,
    CoordinatorProcess, ShardProcess,
};

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// 3 nodes and a coordinator over them.
struct Cluster {
    model: PathBuf,
    nodes: Vec<ShardProcess>,
    _coord: CoordinatorProcess,
    url: String,
}

const METRICS: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

/// The first node serving metrics.
fn cluster() -> anyhow::Result<Cluster> {
    cluster_with([&METRICS, &[], &[]], &[])
}

/// Each node started with its own extra flags, and the coordinator with `coord`.
fn cluster_with(flags: [&[&str]; 3], coord: &[&str]) -> anyhow::Result<Cluster> {
    let model = default_model();
    let dir = model.parent().ok_or_else(|| anyhow::anyhow!("no folder"))?;
    let nodes: Vec<ShardProcess> = flags
        .iter()
        .map(|f| ShardProcess::spawn(dir, f))
        .collect::<Result<_, _>>()?;
    let list: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let list = list.join(",");
    let args: Vec<&str> = ["--nodes", list.as_str()]
        .into_iter()
        .chain(coord.iter().copied())
        .collect();
    let coord = CoordinatorProcess::spawn_with(&model, &args)?;
    Ok(Cluster {
        url: coord.url.clone(),
        model,
        nodes,
        _coord: coord,
    })
}

const PROMPT: &str = "The capital of France is";

#[test]
fn greedy_output_equals_single_process_generation() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let c = cluster()?;
    let want = generate(&c.model, PROMPT, 24)?;
    assert_eq!(completion(&c.url, PROMPT, 24, false)?, want);
    assert_eq!(completion(&c.url, PROMPT, 24, true)?, want);
    // chat, streamed
    let chat = serde_json::json!({"messages": [{"role": "user", "content": "What is 2+2?"}],
                                  "max_tokens": 16, "temperature": 0, "stream": true});
    let (code, body) = post(&format!("{}/v1/chat/completions", c.url), &chat.to_string())?;
    assert_eq!(code, 200);
    assert!(!sse_text(&body)?.is_empty());
    Ok(())
}

#[test]
fn concurrent_streams_equal_their_sequential_output_and_are_batched() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let c = cluster()?;
    let url = &c.url;
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Here is fact number {i} about the ocean:"))
        .collect();
    let sequential: Vec<String> = prompts
        .iter()
        .map(|p| completion(url, p, 12, true))
        .collect::<anyhow::Result<_>>()?;
    let concurrent = all_at_once(
        prompts
            .iter()
            .map(|p| Box::new(move || completion(url, p, 12, true)) as Box<_>)
            .collect(),
    )?;
    assert_eq!(concurrent, sequential);

    // The first stage batched those streams' steps: fewer passes than session steps.
    let at = c.nodes[0].metrics.clone().unwrap_or_default();
    let (_, text) = get(&format!("http://{at}/metrics"))?;
    let batches = metric(&text, "shard_forward_batches_total")?;
    let items = metric(&text, "shard_forward_items_total")?;
    assert!(
        batches > 0.0 && items > batches,
        "batches {batches}, items {items}"
    );
    let busy = metric(&text, "shard_forward_seconds_total")?;
    assert!(busy > 0.0, "compute busy {busy} s after {batches} batches");
    assert_eq!(metric(&text, "shard_plan_epoch")?, 1.0);
    // every pass in the histogram; the first stage relays every one of them on
    assert_eq!(metric(&text, "shard_forward_pass_seconds_count")?, batches);
    let hops = metric(&text, "shard_hop_seconds_count")?;
    assert!(
        hops > 0.0 && hops <= batches,
        "hops {hops}, batches {batches}"
    );
    assert!(metric(&text, "shard_hop_seconds_sum")? > 0.0);

    // The coordinator's latency histograms and token counters saw all 16 requests.
    let (_, text) = get(&format!("{url}/metrics"))?;
    assert_eq!(
        metric(&text, "coordinator_requests_total{outcome=\"ok\"}")?,
        16.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "coordinator_time_to_first_token_seconds_count")?,
        16.0
    );
    assert_eq!(
        metric(&text, "coordinator_request_duration_seconds_count")?,
        16.0
    );
    let generated = metric(&text, "coordinator_generated_tokens_total")?;
    assert!((16.0..=16.0 * 12.0).contains(&generated), "{generated}");
    assert!(metric(&text, "coordinator_time_per_output_token_seconds_sum")? > 0.0);
    assert_eq!(
        metric(&text, "coordinator_admission_wait_seconds_count")?,
        16.0
    );
    Ok(())
}

#[test]
fn malformed_requests_get_400_in_openai_shape() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let c = cluster()?;
    for bad in [
        r#"{"prompt": 5}"#,
        "not json",
        r#"{"prompt":"x","max_tokens":100000}"#,
        r#"{"prompt":"x","temperature":-1}"#,
    ] {
        let (code, body) = post(&format!("{}/v1/completions", c.url), bad)?;
        assert_eq!(code, 400, "{bad} -> {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    Ok(())
}

/// kill -9 of a node mid-stream: the stream ends with a 503 error event, /health stays up,
/// new requests get 503 without the node's address; once the node is back on its address
/// the cluster serves the same output again.
#[test]
fn a_node_killed_mid_stream_gives_503_and_the_cluster_recovers() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut c = cluster()?;
    let url = c.url.clone();
    let want = generate(&c.model, PROMPT, 24)?;
    let long = serde_json::json!({"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 400, "temperature": 0, "stream": true});
    let u = format!("{url}/v1/completions");
    let started = Instant::now();
    let body = std::thread::scope(|s| {
        let h = s.spawn(|| post(&u, &long.to_string()));
        std::thread::sleep(Duration::from_millis(700));
        c.nodes[1].kill();
        h.join()
    });
    let (code, body) = body.map_err(|_| anyhow::anyhow!("thread panicked"))??;
    assert_eq!(code, 200, "the stream had started");
    assert!(
        body.contains("event: error") && body.contains("503"),
        "no error event: {body}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let (_, health) = get(&format!("{url}/health"))?;
    assert!(health.contains("ok"));
    let (code, down) = post(&u, r#"{"prompt":"hi","max_tokens":4}"#)?;
    assert_eq!(code, 503, "a request while a stage is down: {down}");
    // What failed inside the cluster goes to the coordinator's log, not to the client.
    for reply in [&body, &down] {
        assert!(
            !reply.contains(&c.nodes[1].addr) && !reply.contains("127.0.0.1"),
            "a node's address reached the client: {reply}"
        );
    }

    // The node comes back on its address: the coordinator reconnects, reloads its slice and
    // serves again, with the same output.
    let addr = c.nodes[1].addr.clone();
    let dir = c
        .model
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no folder"))?;
    c.nodes[1] = ShardProcess::spawn_at(&addr, dir, &[])?;
    let back = Instant::now();
    loop {
        match completion(&url, PROMPT, 24, false) {
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

#[test]
fn n_choices_run_the_prompt_once() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let c = cluster()?;
    let at = c.nodes[0].metrics.clone().unwrap_or_default();
    let rows = || -> anyhow::Result<f64> {
        let (_, text) = get(&format!("http://{at}/metrics"))?;
        metric(&text, "shard_forward_rows_total")
    };
    let prompt = "Once upon a time, in a small village by the sea, there lived a";
    let body = |n: u32| {
        serde_json::json!({"prompt": prompt, "max_tokens": 4, "n": n, "temperature": 0.8,
                           "seed": 5, "ignore_eos": true})
        .to_string()
    };
    let before = rows()?;
    let (code, text) = post(&format!("{}/v1/completions", c.url), &body(4))?;
    anyhow::ensure!(code == 200, "{code}: {text}");
    let reply: serde_json::Value = serde_json::from_str(&text)?;
    let prompt_tokens = reply["usage"]["prompt_tokens"].as_f64().unwrap_or(0.0);
    assert!(prompt_tokens > 8.0, "{reply}");
    // the prompt but its last token once, then per choice that token and 3 decode steps
    assert_eq!(rows()? - before, prompt_tokens - 1.0 + 4.0 * 4.0, "{reply}");
    // each choice as it would be alone: choice c of n is the request with seed 5 + c
    for (i, choice) in reply["choices"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let alone = serde_json::json!({"prompt": prompt, "max_tokens": 4, "temperature": 0.8,
                                       "seed": 5 + i, "ignore_eos": true});
        let (_, one) = post(&format!("{}/v1/completions", c.url), &alone.to_string())?;
        let one: serde_json::Value = serde_json::from_str(&one)?;
        assert_eq!(choice["text"], one["choices"][0]["text"], "choice {i}");
    }
    Ok(())
}

/// `--activations f16` halves the bytes a stage sends on; f32 stays the default. Every row a
/// stage ran went on, at its node's precision (SmolLM2's 576 values a row).
#[test]
fn each_stage_sends_activations_at_its_precision() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let half = [METRICS[0], METRICS[1], "--activations", "f16"];
    let c = cluster_with([&half, &METRICS, &[]], &[])?;
    let text = completion(&c.url, PROMPT, 16, false)?;
    assert!(!text.trim().is_empty());
    for (i, bytes) in [(0, 2.0), (1, 4.0)] {
        let at = c.nodes[i].metrics.clone().unwrap_or_default();
        // A hop's bytes count once the next stage has acknowledged it; with `--replies
        // direct` the last token reaches the client a moment before that acknowledgement
        // walks back: wait for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, m) = get(&format!("http://{at}/metrics"))?;
            let rows = metric(&m, "shard_forward_rows_total")?;
            assert!(rows > 16.0, "node {i}: {rows} rows");
            let sent = metric(&m, "shard_activation_bytes_sent_total")?;
            if sent == rows * 576.0 * bytes {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i}: {sent} bytes sent for {rows} rows"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// With `--replies direct` the last stage hands each step's token straight to the coordinator
/// (it waits there with `collect`), one hop instead of one per stage; `--replies chain`, the
/// default, sends it back through every stage. Both give the single process's greedy text.
#[test]
fn tokens_come_straight_from_the_last_stage() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let want = generate(&default_model(), PROMPT, 16)?;
    for replies in ["direct", "chain"] {
        let c = cluster_with([&[], &[], &METRICS], &["--replies", replies])?;
        assert_eq!(completion(&c.url, PROMPT, 16, false)?, want, "{replies}");
        let at = c.nodes[2].metrics.clone().unwrap_or_default();
        let (_, m) = get(&format!("http://{at}/metrics"))?;
        let direct = metric(&m, "shard_direct_replies_total")?;
        match replies {
            // the prompt's step and a step per token after the first
            "direct" => assert!(direct >= 8.0, "{direct} steps answered directly"),
            _ => assert_eq!(direct, 0.0),
        }
    }
    Ok(())
}
