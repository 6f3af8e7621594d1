//! Leaving: asked through `leaving/<id>` in etcd (by `shard-node leave`), the node waits
//! until plans without it are committed (of every model served) and its sessions have finished, or until the
//! deadline, when the sessions still running are ended with an error. Then it frees
//! everything and deregisters.

use std::time::{SystemTime, UNIX_EPOCH};

use proto_types::registry::PlanRecord;

use super::register::Registration;
use super::resolve::in_plan;
use super::Member;
use crate::node::lock;

/// The drain's progress.
#[derive(Debug, Default)]
pub struct Drain {
    deadline_unix_ms: Option<u64>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Drain {
    /// One check; `Ok(true)` once the node has left.
    pub async fn step(
        &mut self,
        m: &Member,
        reg: &Registration,
        plans: &[&PlanRecord],
    ) -> cluster_registry::Result<bool> {
        if self.deadline_unix_ms.is_none() {
            match m.registry.leave_request(&m.id).await {
                Ok(Some(r)) => {
                    tracing::info!(
                        deadline_unix_ms = r.deadline_unix_ms,
                        "asked to leave; draining"
                    );
                    self.deadline_unix_ms = Some(r.deadline_unix_ms);
                }
                Ok(None) => return Ok(false),
                Err(cluster_registry::RegistryError::BadRecord { key, reason }) => {
                    // A malformed request still asks the node to leave: at once.
                    tracing::warn!(
                        key,
                        reason,
                        "malformed leave request: leaving without a drain period"
                    );
                    self.deadline_unix_ms = Some(0);
                }
                Err(e) => return Err(e),
            }
        }
        let deadline = self.deadline_unix_ms.unwrap_or(0);
        let sessions = m.node.session_count();
        let done = !in_plan(plans, &m.id) && sessions == 0;
        let late = now_unix_ms() >= deadline;
        if !done && !late {
            return Ok(false);
        }
        if sessions > 0 {
            tracing::warn!(
                sessions,
                "drain deadline passed: ending the sessions still running"
            );
        }
        let bytes = m.node.leave("left the cluster");
        m.registry.deregister(&m.id).await?;
        let etcd_lease = *lock(&reg.etcd_lease);
        if let Err(e) = m.registry.revoke(etcd_lease).await {
            tracing::warn!("revoking etcd lease {etcd_lease}: {e}");
        }
        m.registry.clear_leave(&m.id).await?;
        tracing::info!(
            bytes,
            "left the cluster and deregistered; restart the node to join again"
        );
        Ok(true)
    }
}
