//! `shard-node leave`: asks a node to drain and leave its cluster, and waits until it has.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster_registry::Registry;
use proto_types::registry::LeaveRecord;

/// Options of `leave`.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaveOptions {
    /// etcd endpoint(s).
    #[arg(long)]
    pub etcd: String,
    /// The cluster's name.
    #[arg(long, default_value = "llm")]
    pub cluster: String,
    /// The node's id.
    #[arg(long)]
    pub node: String,
    /// Seconds the node's running sessions get to finish; those still running then are
    /// ended with an error.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout: u64,
    /// etcd over TLS.
    #[command(flatten)]
    pub etcd_tls: cluster_registry::EtcdTlsArgs,
}

/// Asks, then waits for the node's record to go (the drain deadline plus a margin).
pub async fn run(o: LeaveOptions) -> anyhow::Result<()> {
    o.etcd_tls.install()?;
    let reg = Registry::connect(&o.etcd, &o.cluster).await?;
    let Some(rec) = reg.node(&o.node).await? else {
        anyhow::bail!(
            "node `{}` is not registered in cluster {}",
            o.node,
            o.cluster
        );
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let deadline_unix_ms = now + o.drain_timeout * 1000;
    reg.request_leave(&o.node, &LeaveRecord { deadline_unix_ms })
        .await?;
    println!(
        "asked node {} ({}) to leave; its sessions have {} s to finish",
        o.node, rec.addr, o.drain_timeout
    );
    let give_up = Instant::now() + Duration::from_secs(o.drain_timeout + 30);
    while Instant::now() < give_up {
        if reg.node(&o.node).await?.is_none() {
            println!("node {} left the cluster", o.node);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!(
        "node {} is still registered {} s after the drain deadline (is it running?)",
        o.node,
        30
    )
}
