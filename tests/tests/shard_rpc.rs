//! Three real `shard-node serve` processes chained over tarpc, driven by a test client:
//! activations go stage to stage, the last stage samples, and greedy output equals the
//! single-process pipeline. Closing the client's connection frees its sessions.

use std::time::{Duration, Instant};

use candle_core::Device;
use common::device::init_threads;
use common::generate::LocalPipeline;
use common::gguf::GgufFile;
use common::model::LayerRange;
use common::sampling::argmax;
use common::tokenizer::TextTokenizer;
use integration_tests::{connect, default_model, ShardProcess};
use proto_types::*;
use tarpc::context;

fn ctx() -> context::Context {
    let mut c = context::current();
    c.deadline = Instant::now() + Duration::from_secs(60);
    c
}

/// The error code of a call that must fail.
fn code<T: std::fmt::Debug>(r: Result<T, ShardError>) -> ErrorCode {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code,
    }
}

fn sha256(path: &std::path::Path) -> anyhow::Result<String> {
    Ok(common::gguf::sha256(path)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_match_local_generation_and_free_on_disconnect() -> anyhow::Result<()> {
    let model = default_model();
    let models_dir = model
        .parent()
        .ok_or_else(|| anyhow::anyhow!("model has no folder"))?;
    let name = model
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let sha = sha256(&model)?;
    let nodes: Vec<ShardProcess> = (0..3)
        .map(|_| ShardProcess::spawn(models_dir, &[]))
        .collect::<Result<_, _>>()?;
    let ranges = [(0, 10), (10, 20), (20, 30)];
    let epoch = PlanEpoch(1);
    let mut clients = Vec::new();
    for (node, &(start, end)) in nodes.iter().zip(&ranges) {
        let (c, ack) = connect(&node.addr).await?;
        assert_eq!(ack.protocol_version, PROTOCOL_VERSION);
        let info = c
            .load_slice(
                ctx(),
                LoadSlice {
                    model: name.clone(),
                    sha256: sha.clone(),
                    layers: WireLayerRange { start, end },
                    epoch,
                    max_ctx: 512,
                    beside: false,
                },
            )
            .await??;
        assert_eq!((info.first, info.last), (start == 0, end == 30));
        clients.push(c);
    }

    // Bad input gets typed errors, not panics.
    let wrong_sha = LoadSlice {
        model: name.clone(),
        sha256: "00".repeat(32),
        layers: WireLayerRange { start: 0, end: 10 },
        epoch: PlanEpoch(9),
        max_ctx: 512,
        beside: false,
    };
    assert_eq!(
        code(clients[0].load_slice(ctx(), wrong_sha).await?),
        ErrorCode::ModelUnavailable
    );
    let escape = LoadSlice {
        model: "../etc/passwd".into(),
        ..default_load()
    };
    assert_eq!(
        code(clients[0].load_slice(ctx(), escape).await?),
        ErrorCode::InvalidArgument
    );
    let stale = ForwardRequest {
        epoch: PlanEpoch(7),
        items: vec![],
    };
    assert_eq!(
        code(clients[0].forward(ctx(), stale).await?),
        ErrorCode::EpochMismatch
    );
    let unknown = ForwardRequest {
        epoch,
        items: vec![ForwardItem {
            session: SessionId(404),
            start: 0,
            input: StageInput::Tokens(vec![1]),
            pick: true,
            want_logits: false,
            reply: ReplyRoute::Chain,
        }],
    };
    let reply = clients[0].forward(ctx(), unknown).await??;
    assert_eq!(reply.outputs.len(), 1);
    assert_eq!(
        code(reply.outputs.into_iter().next().expect("one outcome")),
        ErrorCode::UnknownSession
    );
    assert_eq!(
        code(clients[0].heartbeat(ctx(), LeaseId(999)).await?),
        ErrorCode::UnknownLease
    );

    // Opens a session on every stage, last stage first, each stage pointing at the next.
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let open = |session, sampling: WireSampling| {
        let (clients, addrs) = (&clients, &addrs);
        async move {
            for i in (0..clients.len()).rev() {
                let req = OpenSession {
                    session,
                    epoch,
                    max_ctx: 512,
                    next: addrs.get(i + 1).cloned(),
                    sampling: sampling.clone(),
                };
                clients[i].open_session(ctx(), req).await??;
            }
            anyhow::Ok(())
        }
    };
    let sessions = [SessionId(1), SessionId(2)];
    for session in sessions {
        open(session, WireSampling::default()).await?;
    }

    let file = GgufFile::open(&model)?;
    let tok = TextTokenizer::from_gguf(&file)?;
    let prompt = tok.encode("The three primary colors are")?;
    // Both sessions step together in one request (one batch on every stage); a third item,
    // for a session that does not exist, fails alone.
    let mut got = [Vec::new(), Vec::new()];
    let mut start = 0u32;
    let mut input = prompt.clone();
    for step in 0..24 {
        let item = |session| ForwardItem {
            session,
            start,
            input: StageInput::Tokens(input.clone()),
            pick: true,
            want_logits: false,
            reply: ReplyRoute::Chain,
        };
        let mut items: Vec<ForwardItem> = sessions.iter().map(|&s| item(s)).collect();
        if step == 0 {
            items.push(item(SessionId(404)));
        }
        let reply = clients[0]
            .forward(ctx(), ForwardRequest { epoch, items })
            .await??;
        let mut outs = reply.outputs.into_iter();
        for g in &mut got {
            g.push(
                outs.next()
                    .ok_or_else(|| anyhow::anyhow!("short reply"))??
                    .pick
                    .ok_or_else(|| anyhow::anyhow!("no pick"))?
                    .token,
            );
        }
        if step == 0 {
            let third = outs
                .next()
                .ok_or_else(|| anyhow::anyhow!("no third outcome"))?;
            assert_eq!(code(third), ErrorCode::UnknownSession);
        }
        assert_eq!(got[0].last(), got[1].last(), "same prompt, same token");
        start += input.len() as u32;
        input = vec![got[0][step]];
    }

    init_threads(Some(1))?;
    let pipe = LocalPipeline::load(&file, &[LayerRange::full(30)?], &Device::Cpu, 512)?;
    let mut s = pipe.session(512)?;
    let mut logits = pipe.prefill(&mut s, &prompt)?;
    let mut want = Vec::new();
    for _ in 0..24 {
        let t = argmax(&logits);
        want.push(t);
        logits = pipe.decode(&mut s, t)?;
    }
    assert_eq!(
        got[0],
        want,
        "cluster: {:?}\nlocal: {:?}",
        tok.decode(&got[0])?,
        tok.decode(&want)?
    );

    let st = clients[1].status(ctx()).await?;
    assert_eq!(st.sessions, 2);
    assert!(st.leases.iter().any(|l| l.kv_cache > 0));

    // A prompt chunk that picks nothing skips the head: no token comes back. A session that
    // asks for log-probabilities gets the chosen token's and the top two, the greedy pick
    // first among them.
    let sampling = [
        WireSampling::default(),
        WireSampling {
            logprobs: Some(2),
            ..WireSampling::default()
        },
    ];
    for (session, sampling) in [SessionId(3), SessionId(4)].into_iter().zip(sampling) {
        open(session, sampling).await?;
    }
    let step = |session, pick| ForwardItem {
        session,
        start: 0,
        input: StageInput::Tokens(prompt.clone()),
        pick,
        want_logits: false,
        reply: ReplyRoute::Chain,
    };
    let items = vec![step(SessionId(3), false), step(SessionId(4), true)];
    let reply = clients[0]
        .forward(ctx(), ForwardRequest { epoch, items })
        .await??;
    let mut outs = reply.outputs.into_iter();
    let skipped = outs
        .next()
        .ok_or_else(|| anyhow::anyhow!("short reply"))??;
    assert_eq!(skipped.pick, None, "no pick asked for, none made");
    let picked = outs
        .next()
        .ok_or_else(|| anyhow::anyhow!("short reply"))??
        .pick
        .ok_or_else(|| anyhow::anyhow!("no pick"))?;
    assert_eq!(picked.token, got[0][0], "the greedy first token");
    let (lp, top) = picked
        .logprobs
        .ok_or_else(|| anyhow::anyhow!("no log-probabilities"))?;
    assert_eq!(top.len(), 2);
    assert_eq!(top[0].0, picked.token);
    assert!(lp <= 0.0 && (lp - top[0].1).abs() < 1e-6 && top[1].1 <= top[0].1);

    // A fork: session 5 runs all of the prompt but its last token; session 6 is forked
    // from it on every stage and both go on from there apart, each with the greedy tokens
    // of the whole prompt, though 6 never ran its start. Closing 5 leaves 6 whole.
    open(SessionId(5), WireSampling::default()).await?;
    let (head, last) = prompt.split_at(prompt.len() - 1);
    let item = |session, start: usize, ids: &[u32], pick| ForwardItem {
        session,
        start: start as u32,
        input: StageInput::Tokens(ids.to_vec()),
        pick,
        want_logits: false,
        reply: ReplyRoute::Chain,
    };
    let items = vec![item(SessionId(5), 0, head, false)];
    clients[0]
        .forward(ctx(), ForwardRequest { epoch, items })
        .await??;
    let fork = |from, to| ForkSession {
        from: SessionId(from),
        to: SessionId(to),
        sampling: WireSampling::default(),
        keep: None,
        max_ctx: None,
        prefix_cache: false,
    };
    for c in &clients {
        c.fork_session(ctx(), fork(5, 6)).await??;
    }
    assert!(
        clients[0].fork_session(ctx(), fork(5, 6)).await?.is_err(),
        "6 is open"
    );
    assert_eq!(
        code(clients[0].fork_session(ctx(), fork(404, 7)).await?),
        ErrorCode::UnknownSession
    );
    let (stranger, _) = connect(&nodes[0].addr).await?;
    assert_eq!(
        code(stranger.fork_session(ctx(), fork(5, 7)).await?),
        ErrorCode::UnknownSession,
        "another connection's session cannot be forked"
    );
    let st = clients[2].status(ctx()).await?;
    assert_eq!(st.sessions, 6, "1 to 6");
    let (mut pos, mut next) = (head.len(), [last[0], last[0]]);
    for (step, &want) in got[0][..4].iter().enumerate() {
        if step == 1 {
            for c in &clients {
                c.close_session(ctx(), SessionId(5)).await??;
            }
        }
        let live: &[u32] = if step == 0 { &[5, 6] } else { &[6] };
        let items = live
            .iter()
            .zip(next)
            .map(|(&s, t)| item(SessionId(u64::from(s)), pos, &[t], true))
            .collect();
        let reply = clients[0]
            .forward(ctx(), ForwardRequest { epoch, items })
            .await??;
        for (k, out) in reply.outputs.into_iter().enumerate() {
            let token = out?.pick.ok_or_else(|| anyhow::anyhow!("no pick"))?.token;
            assert_eq!(token, want, "session {} at step {step}", live[k]);
            next[k] = token;
        }
        pos += 1;
    }

    // A step routed to `collect`: the chain only says it was handed on, and the last stage
    // keeps its token for the session's owner, whether the collect comes after the step or
    // before it.
    open(SessionId(7), WireSampling::default()).await?;
    let key = ReplyKey(0x5eed);
    let direct = |start: usize, ids: &[u32]| ForwardItem {
        reply: ReplyRoute::Collect(key),
        ..item(SessionId(7), start, ids, true)
    };
    let only = |r: ForwardReply| {
        r.outputs
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no outcome"))
    };
    let items = vec![direct(0, &prompt)];
    let ack = only(
        clients[0]
            .forward(ctx(), ForwardRequest { epoch, items })
            .await??,
    )??;
    assert_eq!(
        ack.pick, None,
        "the token does not come back along the chain"
    );
    // another key (a step someone else slipped in carries one) gets nothing: it waits
    let mut brief = context::current();
    brief.deadline = Instant::now() + Duration::from_millis(300);
    assert!(
        clients[2]
            .collect(brief, SessionId(7), 0, ReplyKey(1))
            .await
            .is_err(),
        "the deadline passes"
    );
    let first = clients[2].collect(ctx(), SessionId(7), 0, key).await??;
    assert_eq!(first.pick.map(|p| p.token), Some(got[0][0]));
    let at = prompt.len();
    let early = {
        let last = clients[2].clone();
        tokio::spawn(async move { last.collect(ctx(), SessionId(7), at as u32, key).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let items = vec![direct(at, &[got[0][0]])];
    clients[0]
        .forward(ctx(), ForwardRequest { epoch, items })
        .await??;
    let second = early.await???;
    assert_eq!(second.pick.map(|p| p.token), Some(got[0][1]));
    assert_eq!(
        code(
            clients[2]
                .collect(ctx(), SessionId(7), at as u32, key)
                .await?
        ),
        ErrorCode::InvalidArgument,
        "a step collected already"
    );
    let (stranger, _) = connect(&nodes[2].addr).await?;
    assert_eq!(
        code(
            stranger
                .collect(ctx(), SessionId(7), at as u32 + 1, key)
                .await?
        ),
        ErrorCode::UnknownSession,
        "another connection's session cannot be collected"
    );
    let items = vec![ForwardItem {
        want_logits: true,
        ..direct(at + 1, &[got[0][1]])
    }];
    let refused = only(
        clients[0]
            .forward(ctx(), ForwardRequest { epoch, items })
            .await??,
    )?;
    assert_eq!(
        code(refused),
        ErrorCode::InvalidArgument,
        "logits take the chain"
    );

    // Dropping the client's connections frees its sessions on every node.
    drop(clients);
    for node in &nodes {
        let (c, _) = connect(&node.addr).await?;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let st = c.status(ctx()).await?;
            if st.sessions == 0 && st.leases.iter().all(|l| l.kv_cache == 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sessions not freed on {}: {st:?}",
                node.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn default_load() -> LoadSlice {
    LoadSlice {
        model: String::new(),
        sha256: String::new(),
        layers: WireLayerRange { start: 0, end: 1 },
        epoch: PlanEpoch(1),
        max_ctx: 16,
        beside: false,
    }
}
