//! Traces: a coordinator and 3 nodes export to a real OTLP receiver. One request sent with a
//! known W3C `traceparent` yields one trace holding spans from all 4 processes, rooted in the
//! HTTP request with the GenAI attributes, each stage reached through the previous stage's
//! relay; without an endpoint nothing is exported. A re-plan is a trace of its own across
//! the coordinator and every node; OTLP/HTTP works as gRPC does.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use integration_tests::{
    default_model, free_port, get_json, models_dir, post_with, rss_kib, BackgroundStream,
    CoordinatorProcess, EtcdProcess, OtlpReceiver, ReceivedSpan, ShardProcess,
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// Spans leave each process within 100 ms of ending.
const FAST_EXPORT: [(&str, &str); 1] = [("OTEL_BSP_SCHEDULE_DELAY", "100")];

fn cluster(otlp: Option<&str>) -> anyhow::Result<(Vec<ShardProcess>, CoordinatorProcess)> {
    let flags: Vec<&str> = otlp.map_or(vec![], |e| vec!["--otlp-endpoint", e]);
    let nodes: Vec<ShardProcess> = (0..3)
        .map(|_| ShardProcess::spawn_with_env(&models_dir(), &flags, &FAST_EXPORT))
        .collect::<Result<_, _>>()?;
    let list: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let list = list.join(",");
    let mut args = vec!["--nodes", list.as_str()];
    args.extend(&flags);
    let coord = CoordinatorProcess::spawn_with_env(&default_model(), &args, &FAST_EXPORT)?;
    Ok((nodes, coord))
}

fn request(url: &str) -> anyhow::Result<serde_json::Value> {
    let body = serde_json::json!({"prompt": "The capital of France is", "max_tokens": 6,
                                  "temperature": 0});
    let traceparent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let (code, text) = post_with(
        &format!("{url}/v1/completions"),
        &body.to_string(),
        &[("traceparent", &traceparent)],
    )?;
    anyhow::ensure!(code == 200, "{code}: {text}");
    Ok(serde_json::from_str(&text)?)
}

#[test]
fn one_request_is_one_trace_across_the_coordinator_and_every_stage() -> anyhow::Result<()> {
    let rx = OtlpReceiver::start()?;
    let (_nodes, coord) = cluster(Some(&rx.endpoint))?;
    let reply = request(&coord.url)?;
    let usage = &reply["usage"];
    let trace = |spans: Vec<ReceivedSpan>| -> Vec<ReceivedSpan> {
        spans.into_iter().filter(|s| s.trace_id == TRACE).collect()
    };
    let instances = |spans: &[ReceivedSpan]| {
        let mut v: Vec<String> = spans.iter().map(|s| s.instance.clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let start = Instant::now();
    loop {
        let spans = trace(rx.spans());
        let root_done = spans
            .iter()
            .any(|s| s.service == "coordinator" && s.attr("gen_ai.usage.output_tokens").is_some());
        if root_done && instances(&spans).len() == 4 {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "after 20 s the trace has {} spans from {:?}",
            spans.len(),
            instances(&spans)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // what ended last (the outer spans) is exported within a moment
    std::thread::sleep(Duration::from_millis(600));
    let spans = trace(rx.spans());
    // the coordinator and all 3 nodes, each named apart
    let services: Vec<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert!(services.contains(&"coordinator") && services.contains(&"shard-node"));
    assert_eq!(instances(&spans).len(), 4, "{spans:#?}");
    // the root continues the client's trace, with the GenAI attributes
    let root = spans
        .iter()
        .find(|s| s.service == "coordinator" && s.parent_id == CLIENT_SPAN)
        .ok_or_else(|| anyhow::anyhow!("no span continues the traceparent: {spans:#?}"))?;
    assert_eq!(root.name, "text_completion SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(root.attr("gen_ai.operation.name"), Some("text_completion"));
    assert_eq!(root.attr("gen_ai.request.max_tokens"), Some("6"));
    assert_eq!(
        root.attr("gen_ai.usage.input_tokens"),
        Some(usage["prompt_tokens"].to_string().as_str())
    );
    assert_eq!(
        root.attr("gen_ai.usage.output_tokens"),
        Some(usage["completion_tokens"].to_string().as_str())
    );
    assert_eq!(root.attr("gen_ai.response.finish_reasons"), Some("length"));
    assert_eq!(
        root.attr("gen_ai.response.id"),
        reply["id"].as_str(),
        "{root:#?}"
    );
    assert!(root.attr("gen_ai.server.time_to_first_token").is_some());
    // the nodes' spans belong to it: each has a parent in the trace or the coordinator's RPC
    let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for s in spans.iter().filter(|s| s.service == "shard-node") {
        assert!(
            ids.contains(&s.parent_id.as_str()),
            "{} on {} has a parent outside the trace: {s:#?}",
            s.name,
            s.instance
        );
    }
    // Steps go from stage to stage in the same trace: the first two stages relay, and the
    // next stage's span is a child of the call made in that relay.
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let relaying: BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.name == "relay")
        .map(|s| s.instance.as_str())
        .collect();
    assert_eq!(relaying.len(), 2, "the first two stages relay: {spans:#?}");
    let reached: BTreeSet<&str> = spans
        .iter()
        .filter(|s| {
            by_id
                .get(s.parent_id.as_str())
                .and_then(|call| by_id.get(call.parent_id.as_str()))
                .is_some_and(|r| r.name == "relay" && r.instance != s.instance)
        })
        .map(|s| s.instance.as_str())
        .collect();
    assert_eq!(
        reached.len(),
        2,
        "stages 2 and 3 reached through a relay: {spans:#?}"
    );
    // Every stage's prefill pass is a span under its forward call, with what it ran.
    let passes: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == "forward" && s.service == "shard-node")
        .collect();
    let prompt = usage["prompt_tokens"].to_string();
    let prefilled: BTreeSet<&str> = passes
        .iter()
        .filter(|s| s.attr("rows") == Some(prompt.as_str()))
        .map(|s| s.instance.as_str())
        .collect();
    assert_eq!(
        prefilled.len(),
        3,
        "a prefill span on every stage: {passes:#?}"
    );
    for p in &passes {
        assert!(ids.contains(&p.parent_id.as_str()), "{p:#?}");
        assert!(
            p.attr("layers").is_some() && p.attr("batch_items").is_some(),
            "{p:#?}"
        );
    }
    // The decode policy: 5 decode steps at positions under 32, none sampled; the prefill
    // is the one step traced.
    let steps = spans
        .iter()
        .filter(|s| s.service == "coordinator" && s.name == "ShardNode.forward")
        .count();
    assert_eq!(steps, 1, "only the prefill step is traced: {spans:#?}");
    // the phases sit under the root, the steps under their phase
    let phase = |name: &str| {
        spans
            .iter()
            .find(|s| s.service == "coordinator" && s.name == name && s.parent_id == root.span_id)
    };
    let prefill = phase("prefill").ok_or_else(|| anyhow::anyhow!("no prefill span: {spans:#?}"))?;
    let decode = phase("decode").ok_or_else(|| anyhow::anyhow!("no decode span: {spans:#?}"))?;
    assert_eq!(decode.attr("steps"), Some("5"), "{decode:#?}");
    assert!(spans
        .iter()
        .any(|s| s.name == "ShardNode.forward" && s.parent_id == prefill.span_id));
    // before generation: tokenizing, then admission (a session opened on every stage)
    phase("tokenize").ok_or_else(|| anyhow::anyhow!("no tokenize span: {spans:#?}"))?;
    let admission =
        phase("admission").ok_or_else(|| anyhow::anyhow!("no admission span: {spans:#?}"))?;
    let opened = spans
        .iter()
        .filter(|s| s.name == "ShardNode.open_session" && s.parent_id == admission.span_id)
        .count();
    assert_eq!(opened, 3, "a session opened on every stage: {spans:#?}");
    // each stage frees the session's KV cache at the end, an event in the same trace
    let closed: BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.service == "shard-node" && s.name == "ShardNode.close_session")
        .filter(|s| {
            s.events.iter().any(|(name, a)| {
                let get = |k: &str| a.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
                name == "session closed"
                    && get("kind") == Some("kv_cache")
                    && get("bytes").and_then(|b| b.parse::<u64>().ok()) > Some(0)
            })
        })
        .map(|s| s.instance.as_str())
        .collect();
    assert_eq!(
        closed.len(),
        3,
        "a freed KV cache on every stage: {spans:#?}"
    );
    drop(coord);
    Ok(())
}

/// Off by default: with no endpoint, nothing reaches even the standard OTLP port (4317, where
/// an exporter with no endpoint configured would connect).
#[test]
fn without_an_endpoint_nothing_is_exported() -> anyhow::Result<()> {
    let rx = OtlpReceiver::start_on("127.0.0.1:4317")
        .map_err(|e| anyhow::anyhow!("this test needs 127.0.0.1:4317 free: {e}"))?;
    let (_nodes, coord) = cluster(None)?;
    request(&coord.url)?;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.exports(), 0);
    Ok(())
}

/// 8 concurrent streams, each with its own traceparent: each trace holds its own request
/// only, and a pass that batched several of them is in each of their traces.
#[test]
fn concurrent_requests_keep_their_own_traces_and_share_batched_passes() -> anyhow::Result<()> {
    let rx = OtlpReceiver::start()?;
    let (_nodes, coord) = cluster(Some(&rx.endpoint))?;
    let url = format!("{}/v1/completions", coord.url);
    // 40 tokens from an 8-token prompt: position 32 (a traced decode step) is reached by all
    // 8 at about the same time, in the same passes
    let traces: Vec<String> = (0..8).map(|i| format!("{:032x}", 0xabc0 + i)).collect();
    let replies = std::thread::scope(|s| -> anyhow::Result<Vec<serde_json::Value>> {
        let hs: Vec<_> = traces
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let url = url.clone();
                s.spawn(move || -> anyhow::Result<serde_json::Value> {
                    let body = serde_json::json!({
                        "prompt": format!("Here is fact number {i} about the sea:"),
                        "max_tokens": 40, "temperature": 0, "ignore_eos": true});
                    let parent = format!("00-{t}-{CLIENT_SPAN}-01");
                    let (code, text) =
                        post_with(&url, &body.to_string(), &[("traceparent", &parent)])?;
                    anyhow::ensure!(code == 200, "{code}: {text}");
                    Ok(serde_json::from_str(&text)?)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("panicked"))?)
            .collect()
    })?;
    let start = Instant::now();
    let all = loop {
        let all = rx.spans();
        let roots = all
            .iter()
            .filter(|s| s.service == "coordinator" && s.parent_id == CLIENT_SPAN)
            .count();
        if roots == 8 {
            break all;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "{roots} roots");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(600));
    let all = if rx.spans().len() > all.len() {
        rx.spans()
    } else {
        all
    };
    let mut shared = 0;
    for (t, reply) in traces.iter().zip(&replies) {
        let mine: Vec<&ReceivedSpan> = all.iter().filter(|s| &s.trace_id == t).collect();
        let roots: Vec<&&ReceivedSpan> = mine
            .iter()
            .filter(|s| s.service == "coordinator" && s.parent_id == CLIENT_SPAN)
            .collect();
        assert_eq!(roots.len(), 1, "trace {t}");
        // its own request: the response id it answered with
        assert_eq!(roots[0].attr("gen_ai.response.id"), reply["id"].as_str());
        // every span chains up to that root within the trace
        let ids: HashMap<&str, &ReceivedSpan> =
            mine.iter().map(|s| (s.span_id.as_str(), *s)).collect();
        for s in &mine {
            let mut at = *s;
            let mut hops = 0;
            while at.parent_id != CLIENT_SPAN {
                at = ids.get(at.parent_id.as_str()).copied().ok_or_else(|| {
                    anyhow::anyhow!("{} on {} is cut off from its root", s.name, s.instance)
                })?;
                hops += 1;
                anyhow::ensure!(hops < 64, "a loop of parents");
            }
        }
        shared += mine
            .iter()
            .filter(|s| s.name == "forward" && s.attr("batch_items").is_some_and(|b| b != "1"))
            .count();
    }
    assert!(
        shared > 0,
        "no batched pass appears in the traces it served"
    );
    Ok(())
}

/// An OTLP endpoint where nothing listens: requests still succeed, quickly, and the
/// exporter's queue stays bounded.
#[test]
fn an_unreachable_collector_does_not_hold_requests_up() -> anyhow::Result<()> {
    let nobody = format!("http://127.0.0.1:{}", free_port()?);
    let (_nodes, coord) = cluster(Some(&nobody))?;
    let rss = || rss_kib(coord.pid());
    request(&coord.url)?;
    let before = rss()?;
    let t = Instant::now();
    for _ in 0..20 {
        request(&coord.url)?;
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "20 short requests took {took:?}"
    );
    let grown = rss()?.saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "the coordinator grew {grown} kB over 20 requests"
    );
    Ok(())
}

/// Polls the receiver until `done` holds for the spans received, for at most 30 s.
fn wait_spans(
    rx: &OtlpReceiver,
    what: &str,
    done: impl Fn(&[ReceivedSpan]) -> bool,
) -> anyhow::Result<Vec<ReceivedSpan>> {
    let start = Instant::now();
    loop {
        let spans = rx.spans();
        if done(&spans) {
            return Ok(spans);
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "after 30 s, no {what} among {} spans",
            spans.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the coordinator at `url` serves `epoch` over `stages` nodes.
fn wait_serving(url: &str, epoch: u64, stages: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let v = get_json(&format!("{url}/v1/cluster")).unwrap_or_default();
        if v["epoch"].as_u64() == Some(epoch) && v["nodes"].as_array().map(Vec::len) == Some(stages)
        {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(40),
            "not serving epoch {epoch} on {stages} nodes: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn event_bytes(s: &ReceivedSpan, event: &str, kind: &str) -> u64 {
    s.events
        .iter()
        .filter(|(name, _)| name == event)
        .filter(|(_, a)| a.iter().any(|(k, v)| k == "kind" && v == kind))
        .filter_map(|(_, a)| a.iter().find(|(k, _)| k == "bytes")?.1.parse::<u64>().ok())
        .sum()
}

/// A join that triggers a re-plan is one trace of its own: the coordinator's `plan change`
/// holding PREPARE (a vote per node as an event), the decision in etcd and COMMIT, with every
/// node's RPC spans in it. When the coordinator dies mid-stream, each node frees what its
/// lease held, as events of a `release lease` span there.
#[test]
fn a_join_is_one_two_phase_commit_trace_on_every_node() -> anyhow::Result<()> {
    let rx = OtlpReceiver::start()?;
    let etcd = EtcdProcess::start()?;
    let node = |id: &str| {
        let args = [
            "--etcd",
            &etcd.url,
            "--node-id",
            id,
            "--otlp-endpoint",
            &rx.endpoint,
        ];
        ShardProcess::spawn_with_env(&models_dir(), &args, &FAST_EXPORT)
    };
    let _a = node("a")?;
    let _b = node("b")?;
    let args = [
        "--etcd",
        &etcd.url,
        "--min-nodes",
        "2",
        "--otlp-endpoint",
        &rx.endpoint,
    ];
    let coord = CoordinatorProcess::spawn_with_env(&default_model(), &args, &FAST_EXPORT)?;
    wait_serving(&coord.url, 1, 2)?;
    let _c = node("c")?;
    wait_serving(&coord.url, 2, 3)?;

    let is_join = |s: &ReceivedSpan| {
        s.name == "plan change" && s.attr("epoch") == Some("2") && s.attr("decision").is_some()
    };
    let on_nodes = |spans: &[ReceivedSpan], trace: &str, rpc: &str| -> BTreeSet<String> {
        spans
            .iter()
            .filter(|s| s.trace_id == trace && s.service == "shard-node" && s.name == rpc)
            .map(|s| s.instance.clone())
            .collect()
    };
    let all: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    let spans = wait_spans(&rx, "2PC trace of epoch 2", |spans| {
        spans.iter().filter(|s| is_join(s)).any(|root| {
            on_nodes(spans, &root.trace_id, "ShardNode.commit_slice") == all
                && on_nodes(spans, &root.trace_id, "ShardNode.prepare_slice") == all
        })
    })?;
    let roots: Vec<&ReceivedSpan> = spans.iter().filter(|s| is_join(s)).collect();
    assert_eq!(roots.len(), 1, "one trace for the re-plan: {roots:#?}");
    let root = roots[0];
    assert_eq!(root.service, "coordinator");
    assert!(root.parent_id.is_empty(), "a trace of its own: {root:#?}");
    assert_eq!(root.attr("decision"), Some("COMMIT"));
    let trace: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .collect();
    let child = |name: &str| {
        trace
            .iter()
            .find(|s| s.name == name && s.parent_id == root.span_id)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("no {name} under the plan change: {trace:#?}"))
    };
    let prepare = child("prepare")?;
    let yes = prepare
        .events
        .iter()
        .filter(|(e, _)| e == "vote YES")
        .count();
    assert_eq!(yes, 3, "a vote per node: {prepare:#?}");
    child("decide in etcd")?;
    let commit = child("commit")?;
    // each node's COMMIT sits under the coordinator's call, made in the commit phase
    let by_id: HashMap<&str, &ReceivedSpan> =
        trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    for s in trace
        .iter()
        .filter(|s| s.name == "ShardNode.commit_slice" && s.service == "shard-node")
    {
        let call = by_id.get(s.parent_id.as_str()).copied();
        assert_eq!(
            call.map(|c| c.parent_id.as_str()),
            Some(commit.span_id.as_str()),
            "{s:#?}"
        );
    }
    // no request ran, and the lease heartbeats made no traces
    assert!(
        !spans.iter().any(|s| s.name == "ShardNode.heartbeat"),
        "heartbeats are not traced"
    );

    // The coordinator dies mid-stream: every node frees the stream's KV cache with the lease
    // (the slices stay: they belong to the plan in etcd), as events.
    let body = serde_json::json!({"prompt": "Count: 1, 2,", "max_tokens": 400,
                                  "stream": true, "ignore_eos": true});
    let _stream = BackgroundStream::start(
        &format!("{}/v1/completions", coord.url),
        &body,
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_millis(1500));
    drop(coord);
    let freed = |spans: &[ReceivedSpan]| -> BTreeSet<String> {
        spans
            .iter()
            .filter(|s| s.name == "release lease" && event_bytes(s, "freed", "kv_cache") > 0)
            .map(|s| s.instance.clone())
            .collect()
    };
    wait_spans(&rx, "a KV cache freed on every node", |spans| {
        freed(spans) == all
    })?;
    Ok(())
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`: the same trace reaches an OTLP/HTTP receiver.
#[test]
fn http_protobuf_export_reaches_an_otlp_http_receiver() -> anyhow::Result<()> {
    let rx = OtlpReceiver::start_http()?;
    let env = [
        FAST_EXPORT[0],
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    ];
    let flags = ["--otlp-endpoint", rx.endpoint.as_str()];
    let node = ShardProcess::spawn_with_env(&models_dir(), &flags, &env)?;
    let args = ["--nodes", node.addr.as_str(), flags[0], flags[1]];
    let coord = CoordinatorProcess::spawn_with_env(&default_model(), &args, &env)?;
    request(&coord.url)?;
    wait_spans(&rx, "the root and the node's spans", |spans| {
        let services: BTreeSet<&str> = spans
            .iter()
            .filter(|s| s.trace_id == TRACE)
            .map(|s| s.service.as_str())
            .collect();
        services.len() == 2
            && spans
                .iter()
                .any(|s| s.trace_id == TRACE && s.parent_id == CLIENT_SPAN)
    })?;
    Ok(())
}
