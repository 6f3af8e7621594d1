//! etcd membership and the two-phase commit of shard plans, with a real etcd server and real
//! node and coordinator processes:
//! (a) a node joins during a stream: E+1 commits on every node, no request fails;
//! (b) a node votes NO (memory limit): abort, the old plan serves, prepared bytes go to 0;
//! (c) the coordinator dies after PREPARE, before the decision: nodes free the prepared
//!     slices after the timeout, and a restarted coordinator commits a newer epoch;
//! (d) it dies after the COMMIT decision, before the nodes hear it: they commit from etcd,
//!     and a restarted coordinator resumes the plan from etcd;
//! (e) `shard-node leave` during a stream: the stream completes, the node ends holding 0;
//! (f) after each, every node of the plan reports the same epoch;
//! (g) bad input in etcd or over RPC is refused and changes nothing;
//! (h) etcd answers nothing for longer than every TTL: serving goes on through it and after
//!     it, and no node frees its slice.

use std::process::Command;
use std::time::{Duration, Instant};

use cluster_registry::Registry;
use integration_tests::*;
use proto_types::registry::Decision;
use proto_types::{ErrorCode, NodeStatus, PlanEpoch};

const PROMPT: &str = "Count slowly: 1, 2, 3,";

/// Node flags: one kernel thread, short TTLs so that the crash cases resolve quickly.
fn node_args<'a>(etcd: &'a str, id: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--etcd",
        etcd,
        "--node-id",
        id,
        "--etcd-ttl-secs",
        "3",
        "--heartbeat-ms",
        "300",
        "--lease-ttl-ms",
        "1500",
        "--prepare-timeout-ms",
        "3000",
    ];
    v.extend_from_slice(extra);
    v
}

fn node(etcd: &EtcdProcess, id: &str, extra: &[&str]) -> anyhow::Result<ShardProcess> {
    ShardProcess::spawn(&models_dir(), &node_args(&etcd.url, id, extra))
}

fn coordinator(etcd: &EtcdProcess, extra: &[&str]) -> anyhow::Result<CoordinatorProcess> {
    let mut args = vec!["--etcd", etcd.url.as_str(), "--etcd-ttl-secs", "2"];
    args.extend_from_slice(extra);
    CoordinatorProcess::spawn_with(&default_model(), &args)
}

async fn wait_members(reg: &Registry, n: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    while reg.members().await?.0.len() != n {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "members != {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// etcd, nodes `a` and `b`, and a coordinator serving epoch 1 over them.
async fn two_nodes_serving(
) -> anyhow::Result<(EtcdProcess, Registry, [ShardProcess; 2], CoordinatorProcess)> {
    let etcd = EtcdProcess::start()?;
    let reg = etcd.registry("llm").await?;
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let a = node(&etcd, "a", &metrics)?;
    let b = node(&etcd, "b", &metrics)?;
    wait_members(&reg, 2).await?;
    let coord = coordinator(&etcd, &["--min-nodes", "2"])?;
    wait_serving(&coord.url, 1, 2).await?;
    Ok((etcd, reg, [a, b], coord))
}

/// Waits until the coordinator serves `epoch` over `stages` nodes.
async fn wait_serving(url: &str, epoch: u64, stages: usize) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        let v = get_json(&format!("{url}/v1/cluster")).unwrap_or_default();
        if v["epoch"].as_u64() == Some(epoch) && v["nodes"].as_array().map(Vec::len) == Some(stages)
        {
            return Ok(v);
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(40),
            "not serving epoch {epoch} on {stages} nodes: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node reports `epoch` served, nothing prepared and nothing retiring (f).
async fn wait_same_epoch(nodes: &[&ShardProcess], epoch: u64) -> anyhow::Result<Vec<NodeStatus>> {
    let mut out = Vec::new();
    for n in nodes {
        let (s, _) = wait_status(&n.addr, Duration::from_secs(20), |s| {
            s.epoch == Some(PlanEpoch(epoch))
                && s.prepared_epochs.is_empty()
                && s.retiring_epochs.is_empty()
        })
        .await?;
        out.push(s);
    }
    Ok(out)
}

fn prepared_bytes(s: &NodeStatus) -> u64 {
    s.leases.iter().map(|l| l.prepared).sum()
}

fn long_request(n: u32, stream: bool) -> serde_json::Value {
    serde_json::json!({"prompt": PROMPT, "max_tokens": n, "temperature": 0,
                       "stream": stream, "ignore_eos": true})
}

/// A streamed completion running on a thread; its output is read by [`finish`].
fn start_stream(url: &str, n: u32) -> BackgroundStream {
    BackgroundStream::start(
        &format!("{url}/v1/completions"),
        &long_request(n, true),
        Duration::from_secs(120),
    )
}

fn finish(s: BackgroundStream) -> anyhow::Result<String> {
    let (code, body) = s.finish()?;
    anyhow::ensure!(code == 200, "status {code}: {body}");
    sse_text(&body)
}

/// (a), (e), (f): a node joins while a stream runs, then leaves while another runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_during_streams() -> anyhow::Result<()> {
    let (etcd, reg, [a, b], coord) = two_nodes_serving().await?;
    let reference = completion_with(&coord.url, long_request(200, false))?;

    // (a) join during a stream
    let stream = start_stream(&coord.url, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = node(&etcd, "c", &[])?;
    let v = wait_serving(&coord.url, 2, 3).await?;
    assert_eq!(finish(stream)?, reference, "the stream across the re-plan");
    assert_eq!(v["nodes"][2]["id"], "c", "{v}");
    wait_same_epoch(&[&a, &b, &c], 2).await?;
    let d = reg.decision(PlanEpoch(2)).await?;
    assert_eq!(d.map(|d| d.decision), Some(Decision::Commit));
    assert_eq!(
        completion_with(&coord.url, long_request(200, false))?,
        reference
    );
    // The operator's view: every node, its layers and its epoch.
    let status = Command::new(coordinator_bin())
        .args(["status", "--etcd", &etcd.url])
        .output()?;
    let table = String::from_utf8(status.stdout)?;
    assert!(status.status.success(), "{table}");
    assert!(table.contains("plan epoch 2 (3 stages"), "{table}");
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        let layers = &v["nodes"][i]["layers"];
        let layers = format!("{}..{}", layers[0], layers[1]);
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_default();
        assert!(
            row.contains(&layers) && row.contains(" 2 "),
            "{id} {layers}: {table}"
        );
    }

    // (e) leave during a stream
    let stream = start_stream(&coord.url, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    shard_node_leave(&etcd.url, "c", 60)?;
    assert_eq!(finish(stream)?, reference, "the stream across the leave");
    wait_serving(&coord.url, 3, 2).await?;
    wait_same_epoch(&[&a, &b], 3).await?;
    let s = node_status(&c.addr).await?;
    assert_eq!(s.epoch, None, "{s:?}");
    assert_eq!(s.sessions, 0);
    assert_eq!(
        s.attributed_bytes, 0,
        "the node that left holds nothing: {s:?}"
    );
    assert!(reg.node("c").await?.is_none(), "c is deregistered");
    assert!(reg.leaving().await?.is_empty());
    assert_eq!(
        completion_with(&coord.url, long_request(200, false))?,
        reference
    );
    Ok(())
}

/// (b), (f): a node votes NO for lack of memory beside its current slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_vote_aborts_and_the_old_plan_serves() -> anyhow::Result<()> {
    // Room for 15 layers, the embedding and 6 layers of slack: the 2-node plan fits, but a
    // 3-node plan's 10 layers do not fit beside the 15 held until it commits.
    let file = common::gguf::GgufFile::open(default_model())?;
    let (mut layer, mut embd) = (0u64, 0u64);
    for t in file.tensors() {
        if t.name.starts_with("blk.0.") {
            layer += t.nbytes;
        } else if t.name == "token_embd.weight" {
            embd = t.nbytes;
        }
    }
    let limit = (21 * layer + embd + (1 << 20)).to_string();
    let etcd = EtcdProcess::start()?;
    let reg = etcd.registry("llm").await?;
    let lim = ["--memory-limit", limit.as_str()];
    let a = node(&etcd, "a", &lim)?;
    let b = node(&etcd, "b", &lim)?;
    wait_members(&reg, 2).await?;
    let coord = coordinator(&etcd, &["--min-nodes", "2"])?;
    wait_serving(&coord.url, 1, 2).await?;
    let reference = completion(&coord.url, PROMPT, 24, false)?;

    let c = node(&etcd, "c", &lim)?;
    let start = Instant::now();
    loop {
        if let Some(d) = reg.decision(PlanEpoch(2)).await? {
            assert_eq!(d.decision, Decision::Abort, "{d:?}");
            assert!(d.by.contains("voted NO"), "{d:?}");
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "no decision");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in [&a, &b, &c] {
        wait_status(&n.addr, Duration::from_secs(5), |s| {
            prepared_bytes(s) == 0 && s.prepared_epochs.is_empty()
        })
        .await?;
    }
    wait_same_epoch(&[&a, &b], 1).await?;
    assert_eq!(node_status(&c.addr).await?.epoch, None);
    wait_serving(&coord.url, 1, 2).await?;
    assert_eq!(completion(&coord.url, PROMPT, 24, false)?, reference);
    Ok(())
}

/// (c), (f): killed after PREPARE, before the decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_before_the_decision() -> anyhow::Result<()> {
    let etcd = EtcdProcess::start()?;
    let reg = etcd.registry("llm").await?;
    let a = node(&etcd, "a", &[])?;
    let b = node(&etcd, "b", &[])?;
    wait_members(&reg, 2).await?;
    let mut coord = coordinator(&etcd, &["--min-nodes", "2", "--failpoint", "after-prepare"])?;
    for n in [&a, &b] {
        wait_status(&n.addr, Duration::from_secs(30), |s| {
            s.prepared_epochs == [PlanEpoch(1)] && prepared_bytes(s) > 0
        })
        .await?;
    }
    coord.kill();
    let killed = Instant::now();
    for n in [&a, &b] {
        let (s, _) = wait_status(&n.addr, Duration::from_secs(10), |s| {
            s.prepared_epochs.is_empty() && s.attributed_bytes == 0
        })
        .await?;
        assert_eq!(s.epoch, None, "{s:?}");
    }
    // freed by the prepare timeout (3 s), not before
    assert!(
        killed.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        killed.elapsed()
    );
    let d = reg.decision(PlanEpoch(1)).await?;
    assert_eq!(
        d.as_ref().map(|d| d.decision),
        Some(Decision::Abort),
        "{d:?}"
    );
    assert!(reg.plan().await?.is_none());

    // A restarted coordinator plans afresh, past the aborted epoch.
    let coord = coordinator(&etcd, &["--min-nodes", "2"])?;
    wait_serving(&coord.url, 2, 2).await?;
    wait_same_epoch(&[&a, &b], 2).await?;
    assert_eq!(
        completion(&coord.url, PROMPT, 24, false)?,
        generate(&default_model(), PROMPT, 24)?
    );
    Ok(())
}

/// (d), (f): killed after the COMMIT decision, before the nodes hear it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_the_decision() -> anyhow::Result<()> {
    let etcd = EtcdProcess::start()?;
    let reg = etcd.registry("llm").await?;
    let a = node(&etcd, "a", &[])?;
    let b = node(&etcd, "b", &[])?;
    wait_members(&reg, 2).await?;
    let mut coord = coordinator(
        &etcd,
        &["--min-nodes", "2", "--failpoint", "after-decision"],
    )?;
    let start = Instant::now();
    while reg.decision(PlanEpoch(1)).await?.is_none() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "no decision");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    coord.kill();
    let statuses = wait_same_epoch(&[&a, &b], 1).await?;
    for s in &statuses {
        assert!(
            s.attributed_bytes > 0,
            "the slice stays, held by the plan: {s:?}"
        );
        assert_eq!(prepared_bytes(s), 0);
    }
    // A restarted coordinator resumes epoch 1 from etcd, reusing the loaded slices.
    let coord = coordinator(&etcd, &[])?;
    wait_serving(&coord.url, 1, 2).await?;
    assert_eq!(
        completion(&coord.url, PROMPT, 24, false)?,
        generate(&default_model(), PROMPT, 24)?
    );
    wait_same_epoch(&[&a, &b], 1).await?;
    Ok(())
}

/// (g): malformed records, an epoch that goes backwards, stale 2PC calls and a colliding
/// node id are refused with a typed error or a log line, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_changes_nothing() -> anyhow::Result<()> {
    let etcd = EtcdProcess::start()?;
    let reg = etcd.registry("llm").await?;
    // An earlier aborted epoch, so that the first plan is epoch 2 and epoch 1 lies behind it.
    reg.decide_abort(PlanEpoch(1), "test").await?;
    let a = node(&etcd, "a", &[])?;
    wait_members(&reg, 1).await?;
    let coord = coordinator(&etcd, &[])?;
    wait_serving(&coord.url, 2, 1).await?;
    let reference = completion(&coord.url, PROMPT, 16, false)?;
    let Some((good, _)) = reg.plan().await? else {
        anyhow::bail!("no plan")
    };

    let unchanged = |what: &'static str| {
        let (reg, url, a_addr, reference) = (&reg, &coord.url, &a.addr, &reference);
        async move {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let v = get_json(&format!("{url}/v1/cluster"))?;
            anyhow::ensure!(v["epoch"] == 2, "{what}: {v}");
            let s = node_status(a_addr).await?;
            anyhow::ensure!(
                s.epoch == Some(PlanEpoch(2)) && s.prepared_epochs.is_empty(),
                "{what}: {s:?}"
            );
            anyhow::ensure!(&completion(url, PROMPT, 16, false)? == reference, "{what}");
            anyhow::ensure!(
                reg.decision(PlanEpoch(3)).await?.is_none(),
                "{what}: a re-plan ran"
            );
            Ok::<(), anyhow::Error>(())
        }
    };

    // A malformed plan.
    reg.put_raw("plan", b"{not json").await?;
    assert!(matches!(
        reg.plan().await,
        Err(cluster_registry::RegistryError::BadRecord { .. })
    ));
    unchanged("malformed plan").await?;
    // A well-formed plan whose epoch goes backwards.
    let mut back = good.clone();
    back.epoch = PlanEpoch(1);
    reg.put_raw("plan", &serde_json::to_vec(&back)?).await?;
    unchanged("plan epoch going backwards").await?;
    // A plan of the right shape that breaks the rules (a gap between stages).
    let mut gap = good.clone();
    gap.stages[0].start = 1;
    reg.put_raw("plan", &serde_json::to_vec(&gap)?).await?;
    assert!(matches!(
        reg.plan().await,
        Err(cluster_registry::RegistryError::BadRecord { .. })
    ));
    unchanged("plan with a gap").await?;
    reg.put_raw("plan", &serde_json::to_vec(&good)?).await?;
    // A malformed node record.
    reg.put_raw("nodes/zz", b"[]").await?;
    unchanged("malformed node record").await?;

    // Stale or unknown 2PC calls get typed errors.
    let (client, _) = connect(&a.addr).await?;
    let ctx = || {
        let mut c = tarpc::context::current();
        c.deadline = Instant::now() + Duration::from_secs(10);
        c
    };
    let stale = proto_types::LoadSlice {
        model: good.model.clone(),
        sha256: good.sha256.clone(),
        layers: proto_types::WireLayerRange { start: 0, end: 30 },
        epoch: PlanEpoch(1),
        max_ctx: 64,
        beside: false,
    };
    let e = client.prepare_slice(ctx(), stale).await?.err();
    assert_eq!(e.map(|e| e.code), Some(ErrorCode::EpochMismatch));
    let e = client.commit_slice(ctx(), PlanEpoch(7)).await?.err();
    assert_eq!(e.map(|e| e.code), Some(ErrorCode::NoSlice));
    let e = client.abort_slice(ctx(), PlanEpoch(2)).await?.err();
    assert_eq!(e.map(|e| e.code), Some(ErrorCode::InvalidArgument));
    assert_eq!(
        client.abort_slice(ctx(), PlanEpoch(9)).await?,
        Ok(()),
        "idempotent"
    );
    unchanged("stale 2PC calls").await?;

    // A second node with a taken id fails to join and leaves the record alone.
    let mut dup = ShardProcess::spawn(&models_dir(), &node_args(&etcd.url, "a", &[]))?;
    let status = dup.wait_exit(Duration::from_secs(20))?;
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    assert_eq!(reg.node("a").await?.map(|n| n.addr), Some(a.addr.clone()));
    unchanged("colliding node id").await?;
    Ok(())
}

/// One driver at a time: two coordinators share the cluster, one 2PC commits the first plan,
/// both serve it; with the first coordinator gone, the other drives the next re-plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_driver_at_a_time() -> anyhow::Result<()> {
    let etcd = EtcdProcess::start()?;
    let reg = etcd.registry("llm").await?;
    let a = node(&etcd, "a", &[])?;
    wait_members(&reg, 1).await?;
    let mut first = coordinator(&etcd, &["--id", "first"])?;
    let second = coordinator(&etcd, &["--id", "second"])?;
    wait_serving(&first.url, 1, 1).await?;
    wait_serving(&second.url, 1, 1).await?;
    assert!(
        reg.decision(PlanEpoch(2)).await?.is_none(),
        "a second 2PC ran"
    );
    let expected = generate(&default_model(), PROMPT, 12)?;
    assert_eq!(completion(&second.url, PROMPT, 12, false)?, expected);
    let leader = reg
        .decision(PlanEpoch(1))
        .await?
        .map(|d| d.by)
        .unwrap_or_default();
    // Kill the one that drove epoch 1 (its election lease then lapses), keep the other.
    let survivor = if leader == "first" {
        first.kill();
        second
    } else {
        drop(second);
        first
    };
    let b = node(&etcd, "b", &[])?;
    wait_serving(&survivor.url, 2, 2).await?;
    let d = reg
        .decision(PlanEpoch(2))
        .await?
        .map(|d| d.by)
        .unwrap_or_default();
    assert_ne!(d, leader, "the survivor drove epoch 2");
    wait_same_epoch(&[&a, &b], 2).await?;
    assert_eq!(completion(&survivor.url, PROMPT, 12, false)?, expected);
    Ok(())
}

/// (h) etcd paused for longer than the nodes' registration TTL (3 s) and the lease of their
/// plan owner (1.5 s): a node cannot tell an etcd outage from its own isolation, and keeps its
/// slice; requests are served throughout, and after etcd answers again, with every node
/// holding exactly one committed slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_stops_no_request() -> anyhow::Result<()> {
    let (etcd, _reg, [a, b], coord) = two_nodes_serving().await?;
    let reference = completion_with(&coord.url, long_request(8, false))?;
    let before = wait_same_epoch(&[&a, &b], 1).await?;

    etcd.pause()?;
    let during = serve_for(
        &coord.url,
        &reference,
        Duration::from_secs(8),
        "into the outage",
    )
    .await?;
    for (n, was) in [&a, &b].iter().zip(&before) {
        let s = node_status(&n.addr).await?;
        assert_eq!(s.epoch, was.epoch, "node {} during the outage", n.addr);
        assert_eq!(s.slices.len(), 1, "node {}: {:?}", n.addr, s.slices);
    }
    etcd.resume()?;

    // the registrations lapsed in etcd meanwhile: the nodes register again, and whatever plan
    // the driver commits then, every node ends on one epoch with one slice, and serves
    let after = serve_for(
        &coord.url,
        &reference,
        Duration::from_secs(6),
        "after the outage",
    )
    .await?;
    // both registered again, on one epoch (whichever: a re-plan may still be committing), with
    // one slice each
    wait_members(&etcd.registry("llm").await?, 2).await?;
    let start = Instant::now();
    loop {
        let (sa, sb) = (node_status(&a.addr).await?, node_status(&b.addr).await?);
        let settled = |s: &NodeStatus| {
            s.epoch.is_some()
                && s.slices.len() == 1
                && s.prepared_epochs.is_empty()
                && s.retiring_epochs.is_empty()
        };
        if sa.epoch == sb.epoch && settled(&sa) && settled(&sb) {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "not settled after the outage: {sa:?} {sb:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // the outage shows on /metrics, the coordinator's and the nodes': calls that timed out or
    // broke on the connection
    let mut failed = 0.0;
    for (url, prefix) in [
        (coord.url.clone(), "coordinator"),
        (
            format!("http://{}", a.metrics.as_deref().unwrap_or("?")),
            "shard",
        ),
    ] {
        let text = get(&format!("{url}/metrics"))?.1;
        let member = format!("{prefix}_etcd_member_in_use{{member=\"{}\"}}", etcd.url);
        assert_eq!(metric(&text, &member)?, 1.0, "{text}");
        let count = |kind: &str| {
            metric(
                &text,
                &format!("{prefix}_etcd_connection_failures_total{{kind=\"{kind}\"}}"),
            )
        };
        let n = count("broken")? + count("not_sent")?;
        assert!(n > 0.0, "no failed etcd call counted: {text}");
        failed += n;
    }
    eprintln!(
        "served {during} requests during a {:.1} s outage, {after} after it; {failed} etcd calls failed",
        8.0
    );
    Ok(())
}

/// Sends a request every 500 ms for `span`, each expected to answer `reference`; how many.
async fn serve_for(
    url: &str,
    reference: &str,
    span: Duration,
    when: &str,
) -> anyhow::Result<usize> {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < span {
        let at = start.elapsed().as_secs_f64();
        let text = tokio::task::block_in_place(|| completion_with(url, long_request(8, false)))
            .map_err(|e| e.context(format!("a request {at:.1} s {when}")))?;
        anyhow::ensure!(
            text == reference,
            "{at:.1} s {when}: {text:?}, not {reference:?}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(n)
}
