//! [`Serving`]: the plan new requests run on. A request keeps the [`Cluster`] it started
//! with to its end (sessions on epoch E finish on E); a newer committed epoch replaces it for
//! the requests after.

use std::sync::{Arc, RwLock};

use proto_types::PlanEpoch;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::error::{CoordError, Result};

/// The current plan, if any yet.
#[derive(Debug, Default)]
pub struct Serving(RwLock<Option<Arc<Cluster>>>);

impl Serving {
    /// The plan new requests use, or 503 until there is one.
    pub fn current(&self) -> Result<Arc<Cluster>> {
        self.0
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
    /// heartbeats (they end with `stop`, or once no request holds the cluster any more).
    /// Returns whether it replaced the current plan.
    pub fn replace(&self, c: Arc<Cluster>, stop: &CancellationToken) -> bool {
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|cur| cur.epoch >= c.epoch) {
            return false;
        }
        c.spawn_heartbeats(stop.clone());
        tracing::info!(epoch = %c.epoch, stages = c.nodes.len(), "serving plan");
        *slot = Some(c);
        true
    }
}
