//! Joining: the node's record under an etcd lease, kept alive; the membership lease renewed
//! with it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto_types::registry::NodeRecord;
use proto_types::LeaseId;
use tokio_util::sync::CancellationToken;

use super::Member;
use crate::server::state::lock;

/// The live registration: the etcd lease holding the node's record, and the membership
/// lease on the node that mirrors it.
#[derive(Debug, Clone)]
pub struct Registration {
    /// etcd's lease id.
    pub etcd_lease: Arc<Mutex<i64>>,
    /// Its TTL.
    pub ttl: Duration,
    /// The node-side membership lease.
    pub plan_lease: Arc<Mutex<LeaseId>>,
}

fn record(m: &Member, addr: &str) -> NodeRecord {
    let (_, capacity_bytes) = m.node.free_bytes();
    NodeRecord {
        id: m.id.clone(),
        addr: addr.to_string(),
        device: m.node.cfg.device.to_string(),
        capacity_bytes,
    }
}

/// Registers under a fresh etcd lease. The id may still be held by this node's previous
/// process (killed before its lease ran out), so a conflict is retried for one TTL before it
/// is reported.
async fn register(m: &Member, addr: &str, ttl: i64) -> common::Result<i64> {
    let rec = record(m, addr);
    let give_up = Instant::now() + Duration::from_secs(ttl as u64 + 2);
    loop {
        let lease = m.registry.grant(ttl).await?;
        match m.registry.register(&rec, lease).await {
            Ok(()) => return Ok(lease),
            Err(common::Error::Conflict(why)) if Instant::now() < give_up => {
                let _ = m.registry.revoke(lease).await;
                tracing::info!("{why}; retrying until its lease runs out");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                let _ = m.registry.revoke(lease).await;
                return Err(e);
            }
        }
    }
}

/// Registers the node and grants its membership lease.
pub async fn join(m: &Member, addr: &str, ttl: i64) -> anyhow::Result<Registration> {
    let etcd_lease = register(m, addr, ttl).await?;
    let plan_lease = m
        .node
        .leases
        .grant(format!("etcd {}/{}", m.registry.cluster(), m.id));
    m.node.set_plan_lease(Some(plan_lease));
    *lock(&m.node.node_id) = Some(m.id.clone());
    tracing::info!(
        cluster = m.registry.cluster(),
        id = m.id,
        etcd_lease,
        "joined"
    );
    Ok(Registration {
        etcd_lease: Arc::new(Mutex::new(etcd_lease)),
        ttl: Duration::from_secs(ttl as u64),
        plan_lease: Arc::new(Mutex::new(plan_lease)),
    })
}

/// Keeps the etcd lease alive and renews the membership lease with each answer. When the
/// etcd lease is lost (etcd was unreachable for a TTL), registers again; the membership
/// lease expires on its own TTL meanwhile, freeing what it held.
pub async fn keep_alive(
    m: Member,
    reg: Registration,
    addr: String,
    stop: CancellationToken,
    left: CancellationToken,
) {
    let every = reg.ttl / 3;
    loop {
        let lease = *lock(&reg.etcd_lease);
        let alive = async {
            let (mut keeper, mut stream) = m.registry.keep_alive(lease).await?;
            loop {
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(r) if r.ttl() > 0 => renew_plan_lease(&m, &reg),
                    _ => return Ok::<(), common::Error>(()),
                }
                tokio::time::sleep(every).await;
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = left.cancelled() => return,
            r = alive => match r {
                Ok(()) => tracing::warn!("etcd lease {lease} expired"),
                Err(e) => tracing::warn!("etcd keepalive: {e}"),
            },
        }
        // Lost or broken: register again (unless the node has left meanwhile).
        loop {
            if stop.is_cancelled() || left.is_cancelled() {
                return;
            }
            if let Ok(Some(r)) = m.registry.node(&m.id).await {
                if r.addr == addr {
                    // The record is still there: the old lease lives; keep it alive again.
                    break;
                }
            }
            let ttl = reg.ttl.as_secs() as i64;
            match register(&m, &addr, ttl).await {
                Ok(l) => {
                    *lock(&reg.etcd_lease) = l;
                    tracing::info!(etcd_lease = l, "registered again");
                    renew_plan_lease(&m, &reg);
                    break;
                }
                Err(e) => {
                    tracing::warn!("registering again: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Renews the membership lease, granting a new one if it had expired.
fn renew_plan_lease(m: &Member, reg: &Registration) {
    let mut l = lock(&reg.plan_lease);
    if m.node.leases.renew(*l).is_err() {
        let fresh = m
            .node
            .leases
            .grant(format!("etcd {}/{}", m.registry.cluster(), m.id));
        tracing::warn!("membership lease {} had expired; now {fresh}", *l);
        *l = fresh;
        m.node.set_plan_lease(Some(fresh));
    }
}
