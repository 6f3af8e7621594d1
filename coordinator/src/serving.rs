//! [`Serving`]: the plan new requests run on. A request keeps the [`Cluster`] it started
//! with to its end (sessions on epoch E finish on E); a newer committed epoch replaces it for
//! the requests after.

use std::sync::{Arc, RwLock};

use proto_types::PlanEpoch;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::error::{CoordError, Result};

/// The current plan, if any yet, and the token its clusters' lease heartbeats end with.
#[derive(Debug, Default)]
pub struct Serving {
    current: RwLock<Option<Arc<Cluster>>>,
    /// Woken at every replacement.
    replaced: tokio::sync::Notify,
    /// Apart from the process's shutdown: requests still draining after a shutdown signal
    /// need their leases on the nodes until they end.
    heartbeats: CancellationToken,
}

impl Serving {
    /// The plan new requests use, or 503 until there is one.
    pub fn current(&self) -> Result<Arc<Cluster>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| CoordError::NoPlan("no plan is committed yet".into()))
    }

    /// Its epoch.
    pub fn epoch(&self) -> Option<PlanEpoch> {
        self.current().ok().map(|c| c.epoch)
    }

    /// Serves `c` from now on if its epoch is newer than the current one, starting its
    /// heartbeats (they end with [`Serving::stop_heartbeats`], or once no request holds the
    /// cluster any more). Returns whether it replaced the current plan.
    pub fn replace(&self, c: Arc<Cluster>) -> bool {
        let stop = &self.heartbeats;
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|cur| cur.epoch >= c.epoch) {
            return false;
        }
        c.spawn_heartbeats(stop.clone());
        tracing::info!(epoch = %c.epoch, stages = c.nodes.len(), "serving plan");
        *slot = Some(c);
        drop(slot);
        self.replaced.notify_waiters();
        true
    }

    /// The plan served once it is newer than `epoch`, waiting for it up to `within`; `None`
    /// if none came.
    pub async fn newer_than(
        &self,
        epoch: PlanEpoch,
        within: std::time::Duration,
    ) -> Option<Arc<Cluster>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // registered before the check, so that a replacement in between is not missed
            let replaced = self.replaced.notified();
            tokio::pin!(replaced);
            replaced.as_mut().enable();
            if let Some(c) = self.current().ok().filter(|c| c.epoch > epoch) {
                return Some(c);
            }
            if tokio::time::timeout_at(deadline, replaced).await.is_err() {
                return None;
            }
        }
    }

    /// Ends the heartbeats: the last step of a shutdown, once no request runs any more.
    pub fn stop_heartbeats(&self) {
        self.heartbeats.cancel();
    }
}
