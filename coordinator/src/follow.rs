//! Every coordinator in an etcd cluster follows the committed plan: when `plan` in etcd names
//! a newer epoch whose COMMIT decision is recorded, it connects to that plan's nodes and
//! serves it. A malformed plan, an epoch that goes backwards, or a plan with no COMMIT is
//! logged and changes nothing.

use std::sync::Arc;
use std::time::Duration;

use cluster_registry::Registry;
use proto_types::registry::Decision;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ModelRef};
use crate::serving::Serving;

/// How often etcd is read.
pub const EVERY: Duration = Duration::from_millis(300);

/// Logs each distinct problem once.
#[derive(Debug, Default)]
pub struct Complaint(Option<String>);

impl Complaint {
    /// Logs `msg` at error level unless it was the last complaint.
    pub fn error(&mut self, msg: String) {
        if self.0.as_deref() != Some(msg.as_str()) {
            tracing::error!("{msg}");
            self.0 = Some(msg);
        }
    }

    /// The problem is gone.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

/// Follows the plan until `stop`.
pub async fn run(
    registry: Registry,
    model: Arc<ModelRef>,
    serving: Arc<Serving>,
    stop: CancellationToken,
) {
    let mut complaint = Complaint::default();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let plan = match registry.plan().await {
            Ok(Some((p, _))) => p,
            Ok(None) => continue,
            Err(e) => {
                complaint.error(format!("ignoring the plan in etcd: {e}"));
                continue;
            }
        };
        let current = serving.epoch();
        if current == Some(plan.epoch) {
            complaint.clear();
            continue;
        }
        if let Some(cur) = current.filter(|&c| c > plan.epoch) {
            complaint.error(format!(
                "ignoring the plan in etcd: its epoch {} is behind the served {cur}",
                plan.epoch
            ));
            continue;
        }
        match registry.decision(plan.epoch).await {
            Ok(Some(d)) if d.decision == Decision::Commit => {}
            Ok(_) => {
                complaint.error(format!(
                    "ignoring the plan in etcd: epoch {} has no COMMIT decision",
                    plan.epoch
                ));
                continue;
            }
            Err(e) => {
                complaint.error(format!("reading the decision of epoch {}: {e}", plan.epoch));
                continue;
            }
        }
        match Cluster::attach(&plan, model.clone()).await {
            Ok(c) => {
                complaint.clear();
                serving.replace(Arc::new(c));
            }
            Err(e) => complaint.error(format!("serving plan {}: {e}", plan.epoch)),
        }
    }
}
