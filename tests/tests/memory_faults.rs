//! Fault tests of issue 4: nothing a client created outlives it. Real processes on CPU; each
//! test asserts on the nodes' own accounting (bytes per lease and kind) and on their resident
//! set as the OS reports it.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{
    connect, default_model, get, get_json, keep_alive, kv_bytes, last_stage_session, models_dir,
    node_status, post, wait_status, BackgroundStream, CoordinatorProcess, ShardProcess,
};
use proto_types::*;

/// Node flags for these tests: a short lease TTL, so expiry is quick to observe.
const TTL_MS: u64 = 2000;
const NODE_FLAGS: [&str; 4] = ["--lease-ttl-ms", "2000", "--heartbeat-ms", "400"];
const MIB: i64 = 1 << 20;

fn ctx() -> tarpc::context::Context {
    let mut c = tarpc::context::current();
    c.deadline = Instant::now() + Duration::from_secs(60);
    c
}

fn nodes(n: usize) -> anyhow::Result<Vec<ShardProcess>> {
    let dir = models_dir();
    (0..n)
        .map(|_| ShardProcess::spawn(&dir, &NODE_FLAGS))
        .collect()
}

fn rss(s: &NodeStatus) -> i64 {
    s.process_rss_bytes as i64
}

fn complete(url: &str, prompt: &str, n: u32) -> anyhow::Result<()> {
    let body = serde_json::json!({"prompt": prompt, "max_tokens": n, "temperature": 0});
    let (code, text) = post(&format!("{url}/v1/completions"), &body.to_string())?;
    anyhow::ensure!(code == 200, "status {code}: {text}");
    Ok(())
}

/// Waits until a node holds nothing for anyone but `keep` clients, and its RSS is within
/// 2 MiB of `baseline`; returns how long it took.
async fn back_to(addr: &str, baseline: i64, within: Duration) -> anyhow::Result<Duration> {
    let (s, t) = wait_status(addr, within, |s| {
        s.sessions == 0 && kv_bytes(s) == 0 && (rss(s) - baseline).abs() <= 2 * MIB
    })
    .await?;
    eprintln!(
        "{addr}: rss {} MiB (baseline {} MiB) after {t:?}",
        rss(&s) / MIB,
        baseline / MIB
    );
    Ok(t)
}

/// (a) kill -9 of the coordinator while 8 long streams run. Its connections close at once
/// and the nodes free everything its lease held: sessions and slices. A coordinator that
/// hangs instead (SIGSTOP: connections open, no heartbeats) loses its lease after the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_frees_everything_on_every_node() -> anyhow::Result<()> {
    let model = default_model();
    let ns = nodes(2)?;
    // Warm-up: a first coordinator serves a few requests and goes. What the nodes keep after
    // that (their kernel threads, code pages) is the baseline.
    {
        let coord = CoordinatorProcess::spawn(&model, &ns.iter().collect::<Vec<_>>())?;
        for _ in 0..3 {
            complete(&coord.url, "Warm up with a few words", 8)?;
        }
    }
    let mut idle = Vec::new();
    for n in &ns {
        wait_status(&n.addr, Duration::from_secs(2), |s| s.attributed_bytes == 0).await?;
        tokio::time::sleep(Duration::from_millis(600)).await;
        idle.push(rss(&node_status(&n.addr).await?));
    }
    for hang in [true, false] {
        let mut coord = CoordinatorProcess::spawn(&model, &ns.iter().collect::<Vec<_>>())?;
        for _ in 0..2 {
            complete(&coord.url, "Warm up with a few words", 8)?;
        }
        let streams: Vec<_> = (0..8)
            .map(|_| BackgroundStream::completion(&coord.url, 400, Duration::from_secs(60)))
            .collect();
        // All 8 sessions are open on every node.
        for n in &ns {
            wait_status(&n.addr, Duration::from_secs(20), |s| s.sessions == 8).await?;
        }
        let t0 = Instant::now();
        if hang {
            Command::new("kill")
                .args(["-STOP", &coord.pid().to_string()])
                .status()?;
        } else {
            coord.kill();
        }
        let bound = if hang {
            Duration::from_millis(TTL_MS + 1000)
        } else {
            Duration::from_secs(1)
        };
        for (n, &base) in ns.iter().zip(&idle) {
            let (s, _) = wait_status(&n.addr, bound, |s| {
                s.sessions == 0 && s.attributed_bytes == 0 && s.epoch.is_none()
            })
            .await?;
            assert!(
                s.leases.iter().all(|l| l.client != "coordinator"),
                "the coordinator's lease is gone: {s:?}"
            );
            back_to(
                &n.addr,
                base,
                bound.saturating_sub(t0.elapsed()) + Duration::from_millis(500),
            )
            .await?;
        }
        eprintln!("hang={hang}: freed within {:?}", t0.elapsed());
        if hang {
            Command::new("kill")
                .args(["-CONT", &coord.pid().to_string()])
                .status()?;
        }
        drop(coord);
        drop(streams); // their server is gone: they hang up without waiting
    }
    Ok(())
}

/// (b) The HTTP client drops mid-stream: the session is closed on every stage within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_frees_the_session_on_every_stage() -> anyhow::Result<()> {
    let ns = nodes(3)?;
    let coord = CoordinatorProcess::spawn(&default_model(), &ns.iter().collect::<Vec<_>>())?;
    let stream = BackgroundStream::completion(&coord.url, 400, Duration::from_secs(60));
    for n in &ns {
        wait_status(&n.addr, Duration::from_secs(20), |s| kv_bytes(s) > 0).await?;
    }
    stream.hang_up(); // the client goes away mid-stream
    for n in &ns {
        let (_, t) = wait_status(&n.addr, Duration::from_secs(1), |s| {
            s.sessions == 0 && kv_bytes(s) == 0
        })
        .await?;
        eprintln!("{}: session freed {t:?} after the client left", n.addr);
    }
    Ok(())
}

/// (c) Load, use and unload a slice 10 times (a new plan epoch each time): back to the
/// node's baseline every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_ten_times_returns_to_baseline() -> anyhow::Result<()> {
    let model = default_model();
    let ns = nodes(1)?;
    let addr = &ns[0].addr;
    let name = model
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let sha = common::gguf::sha256(&model)?;
    let (c, ack) = connect(addr).await?;
    keep_alive(c.clone(), ack.lease);
    let mut baseline = None;
    for i in 1..=10u64 {
        let epoch = PlanEpoch(i);
        let load = LoadSlice {
            model: name.clone(),
            sha256: sha.clone(),
            layers: WireLayerRange { start: 0, end: 30 },
            epoch,
            max_ctx: 512,
            beside: false,
        };
        c.load_slice(ctx(), load).await??;
        let session = SessionId(i);
        c.open_session(ctx(), last_stage_session(session, epoch, 512))
            .await??;
        let item = ForwardItem {
            session,
            start: 0,
            input: StageInput::Tokens((1..300).collect()),
            pick: true,
            want_logits: false,
            reply: ReplyRoute::Chain,
        };
        let reply = c
            .forward(
                ctx(),
                ForwardRequest {
                    epoch,
                    items: vec![item],
                },
            )
            .await??;
        assert!(reply.outputs[0].is_ok());
        let s = node_status(addr).await?;
        assert!(
            kv_bytes(&s) > 0 && s.attributed_bytes > kv_bytes(&s),
            "{reply:?} {s:?}"
        );
        c.close_session(ctx(), session).await??;
        c.unload_slice(ctx(), epoch).await??;
        let s = node_status(addr).await?;
        assert_eq!(s.attributed_bytes, 0, "{s:?}");
        // The first round's end is the baseline (the kernel threads and buffers that the
        // first forward pass creates stay); every later round comes back to it.
        match baseline {
            None => {
                tokio::time::sleep(Duration::from_millis(600)).await;
                baseline = Some(rss(&node_status(addr).await?));
            }
            Some(b) => {
                back_to(addr, b, Duration::from_secs(2)).await?;
            }
        }
    }
    Ok(())
}

/// (d) Restart a node 10 times: the coordinator re-attaches each time, serves, and no lease
/// leaks on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_restarts_reattach_without_leaking_leases() -> anyhow::Result<()> {
    let dir = models_dir();
    let mut ns = nodes(2)?;
    let coord = CoordinatorProcess::spawn(&default_model(), &ns.iter().collect::<Vec<_>>())?;
    complete(&coord.url, "Hello", 4)?;
    for round in 0..10 {
        let addr = ns[1].addr.clone();
        ns[1].kill();
        ns[1] = ShardProcess::spawn_at(&addr, &dir, &NODE_FLAGS)?;
        let t = Instant::now();
        while let Err(e) = complete(&coord.url, "Hello", 4) {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "round {round}: {e}");
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("round {round}: serving again after {:?}", t.elapsed());
    }
    for n in &ns {
        let s = node_status(&n.addr).await?;
        let count = |c: &str| s.leases.iter().filter(|l| l.client == c).count();
        assert_eq!(count("coordinator"), 1, "{}: {s:?}", n.addr);
        assert!(count("shard-node") <= 1, "{}: {s:?}", n.addr);
        assert_eq!(
            s.leases.len(),
            count("coordinator") + count("shard-node") + count("test")
        );
        assert_eq!(s.sessions, 0);
    }
    Ok(())
}

/// (e) Soak: 500 requests, sequential and 8-way concurrent, of varied lengths, after a
/// warm-up: every node ends within 2 MiB of its post-warm-up resident set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_of_500_requests_stays_at_baseline() -> anyhow::Result<()> {
    let ns = nodes(2)?;
    let coord = CoordinatorProcess::spawn(&default_model(), &ns.iter().collect::<Vec<_>>())?;
    let prompt = |i: usize| "The sea is wide and the sky is blue. ".repeat(1 + i % 7);
    let url = coord.url.clone();
    let run = |range: std::ops::Range<usize>, width: usize| -> anyhow::Result<()> {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..width)
                .map(|w| {
                    let range = range.clone();
                    let url = &url;
                    s.spawn(move || -> anyhow::Result<()> {
                        for i in range.skip(w).step_by(width) {
                            complete(url, &prompt(i), 1 + (i % 8) as u32)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            hs.into_iter()
                .try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("panicked"))?)
        })
    };
    run(0..24, 8)?; // warm-up
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut base = Vec::new();
    for n in &ns {
        base.push(rss(&node_status(&n.addr).await?));
    }
    run(0..250, 1)?;
    run(250..500, 8)?;
    for (n, &b) in ns.iter().zip(&base) {
        back_to(&n.addr, b, Duration::from_secs(2)).await?;
    }
    Ok(())
}

/// (f) Unknown or stale lease and session ids get typed errors, never a panic; the node
/// serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_stale_ids_get_typed_errors() -> anyhow::Result<()> {
    let ns = nodes(1)?;
    let addr = &ns[0].addr;
    let (a, _) = connect(addr).await?;
    let (b, _) = connect(addr).await?;
    let code = |r: Result<(), ShardError>| r.err().map(|e| e.code);
    let hb = a.heartbeat(ctx(), LeaseId(987_654)).await?.map(|_| ());
    assert_eq!(code(hb), Some(ErrorCode::UnknownLease));
    assert_eq!(
        code(a.close_session(ctx(), SessionId(55)).await?),
        Some(ErrorCode::UnknownSession)
    );
    assert_eq!(
        code(a.unload_slice(ctx(), PlanEpoch(3)).await?),
        Some(ErrorCode::EpochMismatch)
    );
    let stale = ForwardRequest {
        epoch: PlanEpoch(2),
        items: vec![ForwardItem {
            session: SessionId(1),
            start: 0,
            input: StageInput::Tokens(vec![1]),
            pick: true,
            want_logits: false,
            reply: ReplyRoute::Chain,
        }],
    };
    assert_eq!(
        a.forward(ctx(), stale).await?.err().map(|e| e.code),
        Some(ErrorCode::NoSlice)
    );
    let open = last_stage_session(SessionId(1), PlanEpoch(1), 16);
    assert_eq!(
        code(b.open_session(ctx(), open).await?),
        Some(ErrorCode::NoSlice)
    );
    // Still serving.
    assert!(node_status(addr).await?.leases.len() >= 2);
    Ok(())
}

/// Bounds: a node's session bound gives the API's 429; an idle session expires; the
/// coordinator reports every node's memory in `/v1/cluster` and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_idle_expiry_and_cluster_report() -> anyhow::Result<()> {
    let dir = models_dir();
    let flags = [
        &NODE_FLAGS[..],
        &["--max-sessions", "1", "--session-idle-secs", "1"],
    ]
    .concat();
    let ns = [ShardProcess::spawn(&dir, &flags)?];
    let coord = CoordinatorProcess::spawn(&default_model(), &ns.iter().collect::<Vec<_>>())?;
    let first = BackgroundStream::completion(&coord.url, 400, Duration::from_secs(60));
    wait_status(&ns[0].addr, Duration::from_secs(20), |s| kv_bytes(s) > 0).await?;
    let body = r#"{"prompt":"Hello","max_tokens":4}"#;
    let (code, text) = post(&format!("{}/v1/completions", coord.url), body)?;
    assert_eq!(code, 429, "one session is the bound: {text}");
    // The coordinator's view of the node's memory while the first stream runs.
    let v = get_json(&format!("{}/v1/cluster", coord.url))?;
    let mem = &v["nodes"][0]["memory"];
    assert!(mem["kv_cache_bytes"].as_u64() > Some(0), "{v}");
    assert!(mem["weights_bytes"].as_u64() > Some(0), "{v}");
    assert!(mem["process_rss_bytes"].as_u64() > Some(0), "{v}");
    let (_, metrics) = get(&format!("{}/metrics", coord.url))?;
    assert!(metrics.contains(&format!(
        "cluster_node_kv_cache_bytes{{node=\"{}\"}}",
        ns[0].addr
    )));
    first.hang_up();
    // A session opened and left idle is closed after --session-idle-secs.
    let (c, ack) = connect(&ns[0].addr).await?;
    keep_alive(c.clone(), ack.lease);
    wait_status(&ns[0].addr, Duration::from_secs(2), |s| s.sessions == 0).await?;
    c.open_session(ctx(), last_stage_session(SessionId(77), PlanEpoch(1), 64))
        .await??;
    assert_eq!(node_status(&ns[0].addr).await?.sessions, 1);
    let (_, t) = wait_status(&ns[0].addr, Duration::from_secs(3), |s| s.sessions == 0).await?;
    eprintln!("idle session closed after {t:?}");
    Ok(())
}
