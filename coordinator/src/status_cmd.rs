//! `coordinator status`: the cluster as etcd and its nodes see it, as a table (the base
//! model's layers per node; each model loaded at run time on a line of its own above).

use std::fmt::Write;

use cluster_registry::Registry;
use proto_types::{LeaseBytes, NodeStatus};

use crate::cluster::{ctx, NodeConn};

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

fn sum(s: &NodeStatus, f: impl Fn(&LeaseBytes) -> u64) -> u64 {
    s.leases.iter().map(f).sum()
}

/// Reads etcd and asks each registered node for its status; returns the table.
pub async fn run(etcd: &str, cluster: &str) -> anyhow::Result<String> {
    let reg = Registry::connect(etcd, cluster).await?;
    let mut out = String::new();
    let plan = match reg.plan().await {
        Ok(Some((p, _))) => {
            writeln!(
                out,
                "cluster {cluster}: plan epoch {} ({} stages, model {})",
                p.epoch,
                p.stages.len(),
                p.model
            )?;
            Some(p)
        }
        Ok(None) => {
            writeln!(out, "cluster {cluster}: no plan committed yet")?;
            None
        }
        Err(e) => {
            writeln!(out, "cluster {cluster}: the plan in etcd is unusable: {e}")?;
            None
        }
    };
    // the models loaded at run time, each on a plan of its own
    let (models, bad_models) = reg.models().await?;
    for m in &models {
        let stages: Vec<String> = m
            .plan
            .stages
            .iter()
            .map(|s| format!("{} {}..{}", s.node, s.start, s.end))
            .collect();
        writeln!(
            out,
            "model {}: plan epoch {} ({} stages: {})",
            m.id,
            m.plan.epoch,
            m.plan.stages.len(),
            stages.join(", ")
        )?;
    }
    for b in bad_models {
        writeln!(out, "ignored: {b}")?;
    }
    let leaving = reg.leaving().await?;
    writeln!(
        out,
        "{:<20} {:<22} {:<8} {:<8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}  state",
        "NODE",
        "ADDRESS",
        "DEVICE",
        "LAYERS",
        "EPOCH",
        "WEIGHTS",
        "PREPARED",
        "KV",
        "ACTIV",
        "RSS",
        "SESSIONS"
    )?;
    writeln!(out, "{:>57}(MiB)", "")?;
    let (members, bad) = reg.members().await?;
    for b in bad {
        writeln!(out, "ignored: {b}")?;
    }
    for n in members {
        let layers = plan
            .as_ref()
            .and_then(|p| p.stage_of(&n.id))
            .map_or("-".to_string(), |s| format!("{}..{}", s.start, s.end));
        let status = match NodeConn::open(Some(n.id.clone()), &n.addr).await {
            Ok(c) => c
                .client
                .status(ctx(crate::timeouts::TIMEOUTS.status))
                .await
                .ok(),
            Err(_) => None,
        };
        let state = if leaving.contains(&n.id) {
            "leaving"
        } else {
            "member"
        };
        match status {
            Some(s) => writeln!(
                out,
                "{:<20} {:<22} {:<8} {:<8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}  {state}",
                n.id,
                n.addr,
                n.device,
                layers,
                s.epoch.map_or("-".into(), |e| e.to_string()),
                mib(sum(&s, |l| l.weights)),
                mib(sum(&s, |l| l.prepared)),
                mib(sum(&s, |l| l.kv_cache)),
                mib(sum(&s, |l| l.activations)),
                mib(s.process_rss_bytes),
                s.sessions,
            )?,
            None => writeln!(
                out,
                "{:<20} {:<22} {:<8} {:<8} unreachable  {state}",
                n.id, n.addr, n.device, layers
            )?,
        }
    }
    Ok(out)
}
