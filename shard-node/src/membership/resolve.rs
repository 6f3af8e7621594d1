//! The node's side of recovery: every few hundred milliseconds it reads etcd and
//!
//! - commits or frees each prepared slice whose decision is recorded (a coordinator that
//!   died between the decision and COMMIT leaves the decision behind);
//! - aborts a prepared slice with no decision after the prepare timeout, recording the abort
//!   in etcd first, so that no late COMMIT can contradict it;
//! - retires its slice of a model once a plan of that model without it is committed, and its
//!   slice of a model loaded at run time once the model's unload is recorded;
//! - drains and leaves when asked to ([`super::drain`]).

use std::time::Duration;

use proto_types::registry::{Decision, PlanRecord};
use proto_types::PlanEpoch;
use tokio_util::sync::CancellationToken;

use super::drain::Drain;
use super::register::Registration;
use super::Member;
use crate::node::SliceState;

/// How often etcd is read.
const EVERY: Duration = Duration::from_millis(300);
/// A prepared slice is left to its coordinator's COMMIT for this long before etcd is read.
const GRACE: Duration = Duration::from_secs(1);

/// Runs until `stop`, or until the node has left (it cancels `left` after a drain; the
/// registration cancels it when another node has taken this id).
pub async fn run(m: Member, reg: Registration, stop: CancellationToken, left: CancellationToken) {
    let mut drain = Drain::default();
    let mut bad_plan: Option<String> = None;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            // left by another way (its id taken by another node): nothing more to resolve,
            // and a drain request for the id is the other node's
            _ = left.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut read_all = true;
        let plan = match m.registry.plan().await {
            Ok(p) => {
                bad_plan = None;
                p.map(|(p, _)| p)
            }
            Err(e) => {
                // Logged once per distinct problem; a bad plan changes nothing here.
                let msg = e.to_string();
                if bad_plan.as_deref() != Some(msg.as_str()) {
                    tracing::error!("ignoring the plan in etcd: {msg}");
                    bad_plan = Some(msg);
                }
                read_all = false;
                None
            }
        };
        resolve_prepared(&m).await;
        if let Some(p) = &plan {
            // Only a plan whose COMMIT is recorded retires anything, and only its model's.
            if p.stage_of(&m.id).is_none()
                && m.node.slice().is_some_and(|s| s.epoch < p.epoch)
                && matches!(m.registry.decision(p.epoch).await, Ok(Some(d)) if d.decision == Decision::Commit)
            {
                m.node.retire_before(p.epoch, &p.model);
            }
        }
        // the drain needs every model's plan
        let Some(models) = retire_unloaded_and_replaced(&m).await else {
            continue;
        };
        if !read_all {
            continue;
        }
        let mut plans: Vec<&PlanRecord> = plan.iter().collect();
        plans.extend(models.iter());
        match drain.step(&m, &reg, &plans).await {
            Ok(true) => {
                left.cancel();
                return;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("draining: {e}"),
        }
    }
}

async fn resolve_prepared(m: &Member) {
    for (epoch, state) in m.node.slice_states() {
        let SliceState::Prepared(since) = state else {
            continue;
        };
        if since.elapsed() < GRACE {
            continue;
        }
        let decision = match m.registry.decision(epoch).await {
            Ok(Some(d)) => d,
            Ok(None) if since.elapsed() >= m.prepare_timeout => {
                let by = format!(
                    "node {}: no decision within {:?} of PREPARE",
                    m.id, m.prepare_timeout
                );
                match m.registry.decide_abort(epoch, &by).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(%epoch, "recording an abort: {e}");
                        continue;
                    }
                }
            }
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(%epoch, "reading the decision: {e}");
                continue;
            }
        };
        apply(m, epoch, decision.decision, &decision.by);
    }
}

fn apply(m: &Member, epoch: PlanEpoch, d: Decision, by: &str) {
    match d {
        Decision::Commit => match m.node.commit(epoch) {
            Ok(()) => tracing::info!(%epoch, by, "committed from the decision in etcd"),
            Err(e) => tracing::error!(%epoch, "the decision in etcd is COMMIT, but: {e}"),
        },
        Decision::Abort => match m.node.abort(epoch) {
            Ok(bytes) => {
                tracing::info!(%epoch, by, bytes, "aborted from the decision in etcd; prepared slice freed")
            }
            Err(e) => tracing::error!(%epoch, "the decision in etcd is ABORT, but: {e}"),
        },
    }
}

/// The models loaded at run time (`models/` in etcd): a slice of one whose unload is recorded
/// retires, as does one of an older epoch when a plan of its model without this node is
/// committed. Returns their plans; `None` when etcd cannot be read (nothing retires then).
async fn retire_unloaded_and_replaced(m: &Member) -> Option<Vec<PlanRecord>> {
    // The slices served before etcd is read: one committed after the read began is in a plan
    // the read may not show yet.
    let held: Vec<(PlanEpoch, String)> = m
        .node
        .slices_held()
        .into_iter()
        .filter(|s| s.3 == SliceState::Serving)
        .map(|s| (s.0, s.1))
        .collect();
    let read = futures::try_join!(m.registry.unloaded(), m.registry.models());
    let (unloaded, (models, _)) = match read {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("reading the models in etcd: {e}");
            return None;
        }
    };
    for (e, model) in &held {
        if unloaded.contains(e) {
            m.node.retire_epoch(*e, &format!("{model} was unloaded"));
        } else if let Some(x) = models.iter().find(|x| {
            x.plan.model == *model && x.plan.epoch > *e && x.plan.stage_of(&m.id).is_none()
        }) {
            let why = format!("{model}'s plan {} leaves this node out", x.plan.epoch);
            m.node.retire_epoch(*e, &why);
        }
    }
    Some(models.into_iter().map(|x| x.plan).collect())
}

/// Whether any of `plans` names this node (used by the drain).
pub fn in_plan(plans: &[&PlanRecord], id: &str) -> bool {
    plans.iter().any(|p| p.stage_of(id).is_some())
}
