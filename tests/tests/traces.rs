//! Traces: a coordinator and 3 nodes export to a real OTLP receiver. One request sent with a
//! known W3C `traceparent` yields one trace holding spans from all 4 processes, rooted in the
//! HTTP request with the GenAI attributes, each stage reached through the previous stage's
//! relay; without an endpoint nothing is exported.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use integration_tests::{
    default_model, free_port, models_dir, post_with, CoordinatorProcess, OtlpReceiver,
    ReceivedSpan, ShardProcess,
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
    let rss = || -> anyhow::Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", coord.pid()))?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
    };
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
