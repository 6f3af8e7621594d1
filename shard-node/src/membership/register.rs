//! Joining: the node's record under an etcd registration lease, kept alive; the node's plan
//! owner renewed with it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto_types::registry::NodeRecord;
use tokio_util::sync::CancellationToken;

use super::Member;
use crate::node::lock;

/// The live registration: the etcd registration lease holding the node's record.
#[derive(Debug, Clone)]
pub struct Registration {
    /// etcd's lease id.
    pub etcd_lease: Arc<Mutex<i64>>,
    /// Its TTL.
    pub ttl: Duration,
}

fn owner_name(m: &Member) -> String {
    format!("etcd {}/{}", m.registry.cluster(), m.id)
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
async fn register(m: &Member, addr: &str, ttl: i64) -> cluster_registry::Result<i64> {
    let rec = record(m, addr);
    let give_up = Instant::now() + Duration::from_secs(ttl as u64 + 2);
    loop {
        let lease = m.registry.grant(ttl).await?;
        match m.registry.register(&rec, lease).await {
            Ok(()) => return Ok(lease),
            Err(cluster_registry::RegistryError::Conflict(why)) if Instant::now() < give_up => {
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

/// Registers the node and grants its plan owner.
pub async fn join(m: &Member, addr: &str, ttl: i64) -> anyhow::Result<Registration> {
    let etcd_lease = register(m, addr, ttl).await?;
    m.node.join_cluster(&m.id, owner_name(m));
    tracing::info!(
        cluster = m.registry.cluster(),
        id = m.id,
        etcd_lease,
        "joined"
    );
    Ok(Registration {
        etcd_lease: Arc::new(Mutex::new(etcd_lease)),
        ttl: Duration::from_secs(ttl as u64),
    })
}

/// Keeps the etcd registration lease alive, and the plan owner with it: the plan owner is
/// renewed on its own clock, whether etcd answers or not. A node cut off from etcd cannot
/// tell an etcd outage (nothing can re-plan, and its slices are still the plan's) from its
/// own isolation (the cluster re-plans without it once its registration lapses); it keeps its
/// slices, serves what it is asked to, and once it reads etcd again `super::resolve` retires
/// each slice whose model has a committed plan without this node. When the registration lease
/// is lost (etcd was unreachable for a TTL), it registers again.
pub async fn keep_alive(
    m: Member,
    reg: Registration,
    addr: String,
    stop: CancellationToken,
    left: CancellationToken,
) {
    // The plan owner lives --lease-ttl-ms past its last renewal: renew it at least as often as
    // the node asks its own clients to.
    let every = (reg.ttl / 3).min(m.node.cfg.heartbeat_interval);
    let owner = async {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            renew_plan_owner(&m);
        }
    };
    tokio::select! {
        _ = owner => {}
        _ = registration(&m, &reg, &addr, every, &stop, &left) => {}
    }
}

/// The registration lease's keepalive, and registering again when it is lost.
async fn registration(
    m: &Member,
    reg: &Registration,
    addr: &str,
    every: Duration,
    stop: &CancellationToken,
    left: &CancellationToken,
) {
    loop {
        let lease = *lock(&reg.etcd_lease);
        let alive = async {
            let (mut keeper, mut stream) = m.registry.keep_alive(lease).await?;
            loop {
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Ok::<(), cluster_registry::RegistryError>(()),
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
                // Another node took this id while this one was cut off: the plans that name
                // the id mean that node now, so this one holds nothing for them.
                let why = format!("node id {} is registered at {} now", m.id, r.addr);
                tracing::error!("{why}: leaving the cluster, freeing every slice");
                m.node.leave(&why);
                left.cancel();
                return;
            }
            let ttl = reg.ttl.as_secs() as i64;
            match register(m, addr, ttl).await {
                Ok(l) => {
                    *lock(&reg.etcd_lease) = l;
                    tracing::info!(etcd_lease = l, "registered again");
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

/// Renews the plan owner, granting a new one if it had expired.
fn renew_plan_owner(m: &Member) {
    m.node.renew_plan_owner(|| owner_name(m));
}
