//! A shard node in an etcd cluster: it registers under an etcd lease kept alive while it runs
//! ([`register`]), resolves its prepared slices from the decisions recorded in etcd
//! ([`resolve`]), and drains and deregisters when asked to leave ([`drain`]).
//!
//! The node's committed slices belong to its *plan owner* (a connection lease the node grants
//! itself and renews while it is a member): they belong to the plan, not to the coordinator
//! that loaded them, so a coordinator crash does not unload the cluster. Nor does an etcd
//! outage: a node that cannot reach etcd keeps its slices, and once it reads etcd again each
//! slice whose model has a committed plan without this node retires ([`resolve`]); leaving
//! frees them all ([`drain`]).

pub mod drain;
pub mod register;
pub mod resolve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cluster_registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::node::{Node, NodeError};

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
    /// etcd over TLS.
    #[command(flatten)]
    pub etcd_tls: cluster_registry::EtcdTlsArgs,
}

/// The checked options of joining a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinConfig {
    /// etcd endpoint(s).
    pub etcd: String,
    /// The advertised address, if not the bound one.
    pub advertise: Option<String>,
    /// The cluster's name.
    pub cluster: String,
    /// The node's id, if not the advertised address.
    pub node_id: Option<String>,
    /// TTL of the registration lease, in seconds.
    pub ttl_secs: i64,
    /// How long a prepared slice waits for a decision.
    pub prepare_timeout: Duration,
}

impl JoinOptions {
    /// Checks the values; `None` without `--etcd` (the node serves alone).
    pub fn validate(&self) -> Result<Option<JoinConfig>, NodeError> {
        let Some(etcd) = self.etcd.clone() else {
            return Ok(None);
        };
        let bad = |m: String| Err(NodeError::Config(m));
        if self.etcd_ttl_secs < cluster_registry::MIN_TTL_SECS {
            return bad(format!(
                "--etcd-ttl-secs must be at least {}",
                cluster_registry::MIN_TTL_SECS
            ));
        }
        if !cluster_registry::valid_name(&self.cluster) {
            return bad(format!(
                "--cluster `{}`: use letters, digits, '-', '_', '.' or ':'",
                self.cluster
            ));
        }
        if let Some(id) = self
            .node_id
            .as_deref()
            .filter(|id| !cluster_registry::valid_name(id))
        {
            return bad(format!(
                "--node-id `{id}`: use letters, digits, '-', '_', '.' or ':'"
            ));
        }
        if self.prepare_timeout_ms == 0 {
            return bad("--prepare-timeout-ms must be at least 1".into());
        }
        Ok(Some(JoinConfig {
            etcd,
            advertise: self.advertise.clone(),
            cluster: self.cluster.clone(),
            node_id: self.node_id.clone(),
            ttl_secs: self.etcd_ttl_secs,
            prepare_timeout: Duration::from_millis(self.prepare_timeout_ms),
        }))
    }
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
    o: JoinConfig,
    bound: SocketAddr,
    stop: CancellationToken,
    metrics: Arc<crate::server::metrics::Metrics>,
) -> anyhow::Result<()> {
    let registry = Registry::connect(&o.etcd, &o.cluster).await?;
    let _ = metrics.etcd.set(registry.clone());
    let addr = o.advertise.clone().unwrap_or_else(|| bound.to_string());
    let id = o.node_id.clone().unwrap_or_else(|| addr.clone());
    let member = Member {
        node,
        registry,
        id,
        prepare_timeout: o.prepare_timeout,
    };
    let registration = register::join(&member, &addr, o.ttl_secs).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> JoinOptions {
        JoinOptions {
            etcd: Some("http://127.0.0.1:2379".into()),
            advertise: None,
            cluster: "llm".into(),
            node_id: Some("a".into()),
            etcd_ttl_secs: 5,
            prepare_timeout_ms: 30_000,
            etcd_tls: Default::default(),
        }
    }

    fn refused(o: JoinOptions, flag: &str) {
        match o.validate() {
            Err(NodeError::Config(m)) => assert!(m.contains(flag), "{m}"),
            other => panic!("expected a refusal naming {flag}, got {other:?}"),
        }
    }

    #[test]
    fn join_options_are_checked_before_anything_starts() {
        let c = options().validate().expect("valid").expect("joins");
        assert_eq!(c.prepare_timeout, Duration::from_secs(30));
        let alone = JoinOptions {
            etcd: None,
            ..options()
        };
        assert_eq!(alone.validate(), Ok(None));
        refused(
            JoinOptions {
                etcd_ttl_secs: cluster_registry::MIN_TTL_SECS - 1,
                ..options()
            },
            "--etcd-ttl-secs",
        );
        refused(
            JoinOptions {
                cluster: "a/b".into(),
                ..options()
            },
            "--cluster",
        );
        refused(
            JoinOptions {
                node_id: Some("x y".into()),
                ..options()
            },
            "--node-id",
        );
        refused(
            JoinOptions {
                prepare_timeout_ms: 0,
                ..options()
            },
            "--prepare-timeout-ms",
        );
    }
}
