//! Models loaded at run time in an etcd cluster, with a real etcd and real processes:
//! (a) a load through one coordinator's admin API is a two-phase commit recorded in etcd;
//!     every coordinator serves the model, and an unload frees its slices on every node;
//! (b) a load that does not fit is refused, naming each node's shortfall, and leaves no
//!     prepared bytes;
//! (c) the coordinator killed after PREPARE of a load: etcd decides ABORT and the nodes free
//!     the prepared slices, while the base model goes on serving;
//! (d) a node joins and leaves: the driver re-plans every model, and the node leaves only
//!     once no model's plan names it.

use std::time::{Duration, Instant};

use cluster_registry::{PlanKey, Registry};
use integration_tests::*;
use proto_types::registry::Decision;
use proto_types::{NodeStatus, PlanEpoch, WireSliceState};

const KEY: &str = "admin-key-etcd-0123456789";
const PROMPT: &str = "The capital of Japan is";

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn id(p: &std::path::Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn node(etcd: &EtcdProcess, name: &str, extra: &[&str]) -> anyhow::Result<ShardProcess> {
    let mut args = vec![
        "--etcd",
        etcd.url.as_str(),
        "--node-id",
        name,
        "--etcd-ttl-secs",
        "3",
        "--heartbeat-ms",
        "300",
        "--lease-ttl-ms",
        "1500",
        "--prepare-timeout-ms",
        "3000",
    ];
    args.extend_from_slice(extra);
    ShardProcess::spawn(&models_dir(), &args)
}

fn coordinator(etcd: &EtcdProcess, extra: &[&str]) -> anyhow::Result<CoordinatorProcess> {
    let mut args = vec![
        "--etcd",
        etcd.url.as_str(),
        "--etcd-ttl-secs",
        "2",
        "--min-nodes",
        "2",
    ];
    args.extend_from_slice(extra);
    CoordinatorProcess::spawn_with(&default_model(), &args)
}

/// Two registered nodes and a coordinator with the admin API serving the base model on both.
async fn cluster(
    etcd: &EtcdProcess,
    node_flags: &[&str],
    coord_flags: &[&str],
) -> anyhow::Result<(Vec<ShardProcess>, CoordinatorProcess)> {
    let nodes = vec![node(etcd, "a", node_flags)?, node(etcd, "b", node_flags)?];
    let mut flags = vec!["--admin-key", KEY];
    flags.extend_from_slice(coord_flags);
    let coord = coordinator(etcd, &flags)?;
    wait_until(Duration::from_secs(40), "the base model is served", || {
        completion(&coord.url, "Hi", 1, false).is_ok()
    })?;
    Ok((nodes, coord))
}

fn wait_until(within: Duration, what: &str, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !ok() {
        anyhow::ensure!(start.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Bytes of `model`'s slices on a node, in the given states.
fn model_bytes(s: &NodeStatus, model: &str, states: &[WireSliceState]) -> u64 {
    s.slices
        .iter()
        .filter(|x| x.model == model && states.contains(&x.state))
        .map(|x| x.bytes)
        .sum()
}

fn prepared(s: &NodeStatus) -> u64 {
    s.leases.iter().map(|l| l.prepared).sum()
}

/// Weight bytes a node holds, over every lease.
fn weights(s: &NodeStatus) -> u64 {
    s.leases.iter().map(|l| l.weights).sum()
}

fn admin_post(url: &str, file: &str) -> anyhow::Result<(u16, String)> {
    post_with(
        &format!("{url}/admin/models"),
        &serde_json::json!({ "file": file }).to_string(),
        &[("authorization", &format!("Bearer {KEY}"))],
    )
}

fn ask(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
}

/// Waits until both the base model's plan and `model`'s have `n` stages.
async fn wait_stages(reg: &Registry, model: &str, n: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    let key = PlanKey::Model(model.to_string());
    loop {
        let base = reg.plan().await?.map(|(p, _)| p.stages.len());
        let other = reg.plan_at(&key).await?.map(|(p, _)| p.stages.len());
        if base == Some(n) && other == Some(n) {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(40),
            "plans of {base:?} and {other:?} stages, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (a), (d)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_loaded_through_etcd_is_served_everywhere_and_unloaded_to_zero(
) -> anyhow::Result<()> {
    let (smol, gemma) = (default_model(), gemma3_model());
    let etcd = EtcdProcess::start()?;
    let reg: Registry = etcd.registry("llm").await?;
    let (nodes, one) = cluster(&etcd, &[], &[]).await?;
    // a second coordinator, without the admin API: it follows the set in etcd
    let two = coordinator(&etcd, &[])?;
    let (gemma_file, gemma_id) = (file_name(&gemma), id(&gemma));

    let (code, text) = admin_post(&one.url, &gemma_file)?;
    assert_eq!(code, 201, "{text}");
    let loaded: serde_json::Value = serde_json::from_str(&text)?;
    let epoch = PlanEpoch(loaded["epoch"].as_u64().unwrap_or_default());
    // the plan is at models/<id>, committed by a decision recorded in etcd
    let (plan, _) = reg
        .plan_at(&PlanKey::Model(gemma_id.clone()))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no plan of {gemma_id} in etcd"))?;
    assert_eq!(
        (plan.epoch, plan.model.as_str()),
        (epoch, gemma_file.as_str())
    );
    assert_eq!(plan.stages.len(), 2);
    let d = reg.decision(epoch).await?;
    assert_eq!(d.map(|d| d.decision), Some(Decision::Commit));
    // the base model's plan is still its own
    let (base, _) = reg
        .plan()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no base plan"))?;
    assert_eq!(base.model, file_name(&smol));

    // both coordinators serve it, as it runs alone; the base model too
    let alone = generate(&gemma, PROMPT, 12)?;
    assert_eq!(completion_with(&one.url, ask(&gemma_id))?, alone);
    wait_until(
        Duration::from_secs(20),
        "the second coordinator serves it",
        || {
            post(
                &format!("{}/v1/completions", two.url),
                &ask(&gemma_id).to_string(),
            )
            .is_ok_and(|(code, _)| code == 200)
        },
    )?;
    assert_eq!(completion_with(&two.url, ask(&gemma_id))?, alone);
    assert_eq!(
        completion_with(&two.url, ask(&id(&smol)))?,
        generate(&smol, PROMPT, 12)?
    );
    for n in &nodes {
        let s = node_status(&n.addr).await?;
        assert!(
            model_bytes(&s, &gemma_file, &[WireSliceState::Serving]) > 0,
            "{s:?}"
        );
    }

    // (d) a node joins: the driver re-plans the base model, then this one, over all three;
    // then it leaves, and waits until neither plan names it
    let c = node(&etcd, "c", &[])?;
    wait_stages(&reg, &gemma_id, 3).await?;
    for url in [&one.url, &two.url] {
        wait_until(Duration::from_secs(20), "serving the 3-node plan", || {
            get_json(&format!("{url}/v1/cluster")).is_ok_and(|v| {
                v["models"].as_array().is_some_and(|ms| {
                    ms.iter()
                        .all(|m| m["nodes"].as_array().map(Vec::len) == Some(3))
                })
            })
        })?;
        assert_eq!(completion_with(url, ask(&gemma_id))?, alone);
    }
    shard_node_leave(&etcd.url, "c", 30)?;
    wait_stages(&reg, &gemma_id, 2).await?;
    let s = node_status(&c.addr).await?;
    assert_eq!(
        s.attributed_bytes, 0,
        "the node that left holds nothing: {s:?}"
    );
    for url in [&one.url, &two.url] {
        wait_until(Duration::from_secs(20), "serving the 2-node plan", || {
            completion_with(url, ask(&gemma_id)).is_ok_and(|t| t == alone)
        })?;
    }

    // the operator's view lists it with its plan
    let status = std::process::Command::new(coordinator_bin())
        .args(["status", "--etcd", &etcd.url])
        .output()?;
    let table = String::from_utf8(status.stdout)?;
    assert!(status.status.success(), "{table}");
    assert!(
        table.contains(&format!("model {gemma_id}: plan epoch")) && table.contains("(2 stages"),
        "{table}"
    );

    // loading it again through either coordinator is refused
    assert_eq!(admin_post(&one.url, &gemma_file)?.0, 409);
    // the base model stays
    let delete = |url: &str, model: &str| {
        call_with(
            "DELETE",
            &format!("{url}/admin/models/{model}"),
            &[("authorization", &format!("Bearer {KEY}"))],
        )
    };
    assert_eq!(delete(&one.url, &id(&smol))?.0, 409);

    // unloaded: recorded in etcd, 404 on both coordinators, 0 bytes of it on every node
    let (last, _) = reg
        .plan_at(&PlanKey::Model(gemma_id.clone()))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no plan of {gemma_id} in etcd"))?;
    assert!(last.epoch > epoch, "re-planned twice since the load");
    let (code, text) = delete(&one.url, &gemma_id)?;
    assert_eq!(code, 200, "{text}");
    assert!(reg
        .plan_at(&PlanKey::Model(gemma_id.clone()))
        .await?
        .is_none());
    assert!(reg.unloaded().await?.contains(&last.epoch));
    for url in [&one.url, &two.url] {
        wait_until(
            Duration::from_secs(10),
            "404 for the unloaded model",
            || {
                post(
                    &format!("{url}/v1/completions"),
                    &ask(&gemma_id).to_string(),
                )
                .is_ok_and(|(code, _)| code == 404)
            },
        )?;
    }
    for n in &nodes {
        let (s, _) = wait_status(&n.addr, Duration::from_secs(10), |s| {
            s.slices.iter().all(|x| x.model != gemma_file)
        })
        .await?;
        assert!(
            model_bytes(&s, &file_name(&smol), &[WireSliceState::Serving]) > 0,
            "{s:?}"
        );
    }
    assert_eq!(
        completion_with(&two.url, ask(&id(&smol)))?,
        generate(&smol, PROMPT, 12)?
    );
    Ok(())
}

/// (b)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_does_not_fit_is_refused_and_leaves_nothing_prepared() -> anyhow::Result<()> {
    let (smol, gemma) = (default_model(), gemma3_model());
    // Room for 21 of SmolLM2's 30 layers and its embedding on each node: its 2-node plan
    // fits, Gemma 3's half beside it does not.
    let file = common::gguf::GgufFile::open(&smol)?;
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
    let (nodes, coord) = cluster(&etcd, &["--memory-limit", &limit], &[]).await?;
    // once the session of the request that found the base model served is closed (its
    // cache is freed just after the answer)
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for n in &nodes {
            let (s, _) = wait_status(&n.addr, Duration::from_secs(5), |s| s.sessions == 0).await?;
            v.push(s.attributed_bytes);
        }
        v
    };

    let (code, text) = admin_post(&coord.url, &file_name(&gemma))?;
    assert_eq!(code, 400, "{text}");
    // refused by the planner, naming each node that is short and by how much, before any
    // node loads anything
    assert!(text.contains("no plan fits"), "{text}");
    for node in ["node 0", "node 1"] {
        assert!(text.contains(node), "{text}");
    }
    assert!(text.contains("short"), "{text}");
    // no plan of it is kept, and nothing of it is left on any node
    assert!(reg.plan_at(&PlanKey::Model(id(&gemma))).await?.is_none());
    for (n, held) in nodes.iter().zip(before) {
        let (s, _) = wait_status(&n.addr, Duration::from_secs(5), |s| {
            prepared(s) == 0 && s.prepared_epochs.is_empty()
        })
        .await?;
        assert_eq!(s.attributed_bytes, held, "{s:?}");
        assert_eq!(
            model_bytes(
                &s,
                &file_name(&gemma),
                &[WireSliceState::Prepared, WireSliceState::Serving]
            ),
            0
        );
    }
    assert_eq!(
        completion(&coord.url, PROMPT, 12, false)?,
        generate(&smol, PROMPT, 12)?
    );
    Ok(())
}

/// (c)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_prepare_of_a_load_the_nodes_free_what_it_prepared() -> anyhow::Result<()> {
    let (smol, gemma) = (default_model(), gemma3_model());
    let etcd = EtcdProcess::start()?;
    let reg = etcd.registry("llm").await?;
    let (nodes, mut coord) = cluster(&etcd, &[], &["--failpoint", "load-after-prepare"]).await?;
    let served: Vec<NodeStatus> = {
        let mut v = Vec::new();
        for n in &nodes {
            v.push(node_status(&n.addr).await?);
        }
        v
    };
    // the load stops after every node voted YES, before the decision
    let url = coord.url.clone();
    let gemma_file = file_name(&gemma);
    let load = std::thread::spawn(move || admin_post(&url, &gemma_file));
    let mut epoch = None;
    for n in &nodes {
        let (s, _) = wait_status(&n.addr, Duration::from_secs(60), |s| {
            !s.prepared_epochs.is_empty() && prepared(s) > 0
        })
        .await?;
        epoch = s.prepared_epochs.first().copied();
    }
    let epoch = epoch.ok_or_else(|| anyhow::anyhow!("nothing prepared"))?;
    coord.kill();
    let _ = load.join();
    let killed = Instant::now();
    // etcd decides: no decision by the prepare timeout, so a node records ABORT, and each
    // frees its prepared slice; the base model's slices stay
    for (n, before) in nodes.iter().zip(&served) {
        let (s, _) = wait_status(&n.addr, Duration::from_secs(15), |s| {
            s.prepared_epochs.is_empty() && prepared(s) == 0
        })
        .await?;
        // the slices are as before; what the killed coordinator's lease held (its prefix
        // cache, present or not when `served` was read) is gone with it
        assert_eq!(weights(&s), weights(before), "{s:?}");
        assert_eq!(
            s.leases.iter().map(|l| l.prefix_cache).sum::<u64>(),
            0,
            "{s:?}"
        );
        assert_eq!(s.epoch, before.epoch);
    }
    assert!(killed.elapsed() >= Duration::from_millis(1000));
    let d = reg.decision(epoch).await?;
    assert_eq!(d.map(|d| d.decision), Some(Decision::Abort));
    assert!(reg.plan_at(&PlanKey::Model(id(&gemma))).await?.is_none());

    // a new coordinator serves the base model from etcd, and can load the model now
    let coord = coordinator(&etcd, &["--admin-key", KEY])?;
    wait_until(Duration::from_secs(30), "the base model is served", || {
        completion(&coord.url, "Hi", 1, false).is_ok()
    })?;
    assert_eq!(
        completion(&coord.url, PROMPT, 12, false)?,
        generate(&smol, PROMPT, 12)?
    );
    let (code, text) = admin_post(&coord.url, &file_name(&gemma))?;
    assert_eq!(code, 201, "{text}");
    assert_eq!(
        completion_with(&coord.url, ask(&id(&gemma)))?,
        generate(&gemma, PROMPT, 12)?
    );
    Ok(())
}
