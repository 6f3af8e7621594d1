//! The node's side of recovery: every few hundred milliseconds it reads etcd and
//!
//! - commits or frees each prepared slice whose decision is recorded (a coordinator that
//!   died between the decision and COMMIT leaves the decision behind);
//! - aborts a prepared slice with no decision after the prepare timeout, recording the abort
//!   in etcd first, so that no late COMMIT can contradict it;
//! - retires its slice once a plan without it is committed;
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

/// Runs until `stop`, or until the node has left (then cancels `left`).
pub async fn run(m: Member, reg: Registration, stop: CancellationToken, left: CancellationToken) {
    let mut drain = Drain::default();
    let mut bad_plan: Option<String> = None;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
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
                None
            }
        };
        resolve_prepared(&m).await;
        if let Some(p) = &plan {
            // Only a plan whose COMMIT is recorded retires anything.
            if p.stage_of(&m.id).is_none()
                && m.node.slice().is_some_and(|s| s.epoch < p.epoch)
                && matches!(m.registry.decision(p.epoch).await, Ok(Some(d)) if d.decision == Decision::Commit)
            {
                m.node.retire_before(p.epoch);
            }
        }
        match drain.step(&m, &reg, plan.as_ref()).await {
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

/// Whether `plan` names this node (used by the drain).
pub fn in_plan(plan: Option<&PlanRecord>, id: &str) -> bool {
    plan.is_some_and(|p| p.stage_of(id).is_some())
}
