//! A shard node in an etcd cluster: it registers under an etcd lease kept alive while it runs
//! ([`register`]), resolves its prepared slices from the decisions recorded in etcd
//! ([`resolve`]), and drains and deregisters when asked to leave ([`drain`]).
//!
//! The node's committed slices belong to its *plan owner* (a connection lease the node grants
//! itself, renewed by each keepalive of the etcd *registration lease*): they belong to the
//! plan, not to the coordinator that loaded them, so a coordinator crash does not unload the
//! cluster. Losing the etcd registration for longer than the lease TTL frees them.

pub mod drain;
pub mod register;
pub mod resolve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cluster_registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// Options of `serve` for joining a cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinOptions {
    /// etcd endpoint(s), e.g. `http://127.0.0.1:2379`: join the cluster registered there.
    #[arg(long)]
    pub etcd: Option<String>,
    /// The address other processes reach this node at (default: the bound listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// The cluster's name: its keys live under `/<cluster>/` in etcd.
    #[arg(long, default_value = "llm")]
    pub cluster: String,
    /// The node's id in the cluster (default: the advertised address).
    #[arg(long)]
    pub node_id: Option<String>,
    /// TTL of the etcd registration, in seconds: a node silent for this long is gone.
    #[arg(long, default_value_t = 5)]
    pub etcd_ttl_secs: i64,
    /// A prepared slice with no decision in etcd this long after PREPARE is aborted (the
    /// node records the abort in etcd first) and freed.
    #[arg(long, default_value_t = 30_000)]
    pub prepare_timeout_ms: u64,
}

/// What the membership tasks share.
#[derive(Debug, Clone)]
pub struct Member {
    /// The node.
    pub node: Arc<Node>,
    /// etcd.
    pub registry: Registry,
    /// The node's id.
    pub id: String,
    /// How long a prepared slice waits for a decision.
    pub prepare_timeout: Duration,
}

/// Joins the cluster and runs the membership tasks until `stop` or until the node has left.
/// Fails when etcd cannot be reached or the id is taken; the node then shuts down.
pub async fn run(
    node: Arc<Node>,
    o: JoinOptions,
    bound: SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let Some(url) = o.etcd.clone() else {
        return Ok(());
    };
    if o.etcd_ttl_secs < cluster_registry::MIN_TTL_SECS {
        anyhow::bail!(
            "--etcd-ttl-secs must be at least {}",
            cluster_registry::MIN_TTL_SECS
        );
    }
    let registry = Registry::connect(&url, &o.cluster).await?;
    let addr = o.advertise.clone().unwrap_or_else(|| bound.to_string());
    let id = o.node_id.clone().unwrap_or_else(|| addr.clone());
    let member = Member {
        node,
        registry,
        id,
        prepare_timeout: Duration::from_millis(o.prepare_timeout_ms),
    };
    let registration = register::join(&member, &addr, o.etcd_ttl_secs).await?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "joined {} as {}", o.cluster, member.id);
        let _ = out.flush();
    }
    let left = CancellationToken::new();
    let keep = tokio::spawn(register::keep_alive(
        member.clone(),
        registration.clone(),
        addr,
        stop.clone(),
        left.clone(),
    ));
    resolve::run(member, registration, stop, left).await;
    let _ = keep.await;
    Ok(())
}
