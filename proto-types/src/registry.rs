//! The records a cluster keeps in etcd, as JSON values. Key layout, under `/<cluster>/`:
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `nodes/<id>` | [`NodeRecord`] | the node's etcd lease (kept alive while it runs) |
//! | `plan` | [`PlanRecord`], the committed plan of the model `coordinator serve --model` names | written with each COMMIT decision |
//! | `models/<id>` | [`PlanRecord`], the committed plan of a model loaded at run time (`<id>`: its file name without `.gguf`) | written with each COMMIT decision; deleted by its unload |
//! | `unloaded/<epoch>` | [`UnloadRecord`]: the model served by that epoch's plan was unloaded, and every node frees its slices | written once, with the unload |
//! | `epoch` | the last epoch reserved by a plan change | rewritten by each (a guarded transaction) |
//! | `txn/<epoch>` | [`DecisionRecord`], the 2PC decision of an epoch | written once, never changed |
//! | `leaving/<id>` | [`LeaveRecord`], a drain request | until the node has left |
//! | `election` | the 2PC driver's election (etcd's election API) | the driver's etcd lease |
//!
//! Values are checked on read ([`PlanRecord::validate`]): a malformed one is an error, never a
//! half-read plan.

use serde::{Deserialize, Serialize};

use crate::ids::PlanEpoch;

/// A registered shard node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its id, unique in the cluster.
    pub id: String,
    /// Where it serves tarpc.
    pub addr: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Bytes it may use in all (its memory limit, or the device's total).
    pub capacity_bytes: u64,
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    /// The node's id.
    pub node: String,
    /// The node's address.
    pub addr: String,
    /// First block.
    pub start: u32,
    /// One past the last block.
    pub end: u32,
}

/// A shard plan: which node serves which blocks, for one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// The epoch.
    pub epoch: PlanEpoch,
    /// Model file name in every node's models directory.
    pub model: String,
    /// Its sha256.
    pub sha256: String,
    /// Context bound of every session.
    pub max_ctx: u32,
    /// The stages, first first.
    pub stages: Vec<StageRecord>,
}

impl PlanRecord {
    /// Checks the plan's shape: an epoch of at least 1, and stages that cover `0..end`
    /// contiguously, each on a distinct node with an address.
    pub fn validate(&self) -> Result<(), String> {
        if self.epoch.0 == 0 {
            return Err("epoch 0 is not a plan epoch".into());
        }
        if self.stages.is_empty() {
            return Err("no stages".into());
        }
        if self.model.is_empty() || self.sha256.len() != 64 {
            return Err("the model name or sha256 is missing".into());
        }
        let mut next = 0;
        for (i, s) in self.stages.iter().enumerate() {
            if s.start != next || s.end <= s.start {
                return Err(format!(
                    "stage {i} covers {}..{}, expected a non-empty range from {next}",
                    s.start, s.end
                ));
            }
            if s.node.is_empty() || s.addr.is_empty() {
                return Err(format!("stage {i} has no node id or address"));
            }
            if self.stages[..i].iter().any(|o| o.node == s.node) {
                return Err(format!("node {} appears twice", s.node));
            }
            next = s.end;
        }
        Ok(())
    }

    /// The stage served by node `id`.
    pub fn stage_of(&self, id: &str) -> Option<&StageRecord> {
        self.stages.iter().find(|s| s.node == id)
    }
}

/// The outcome of an epoch's two-phase commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Every node voted YES; the plan is in `plan`.
    Commit,
    /// A NO vote, a timeout, or a driver that went away.
    Abort,
}

/// `txn/<epoch>`: a decision, written once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// The epoch decided.
    pub epoch: PlanEpoch,
    /// What was decided.
    pub decision: Decision,
    /// Who decided (a coordinator id, or a node that timed out), and why.
    pub by: String,
}

/// `unloaded/<epoch>`: the plan of `epoch` served `model`, which was unloaded; every node
/// retires its slice of that epoch (and frees it once its sessions end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnloadRecord {
    /// The epoch of the unloaded plan.
    pub epoch: PlanEpoch,
    /// The model's id.
    pub model: String,
    /// Who unloaded it.
    pub by: String,
}

/// `leaving/<id>`: drain this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveRecord {
    /// Sessions still running at this time (Unix milliseconds) are ended with an error.
    pub deadline_unix_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(stages: &[(&str, u32, u32)]) -> PlanRecord {
        PlanRecord {
            epoch: PlanEpoch(2),
            model: "m.gguf".into(),
            sha256: "0".repeat(64),
            max_ctx: 64,
            stages: stages
                .iter()
                .map(|&(n, start, end)| StageRecord {
                    node: n.into(),
                    addr: format!("{n}:1"),
                    start,
                    end,
                })
                .collect(),
        }
    }

    #[test]
    fn validation() {
        assert_eq!(plan(&[("a", 0, 10), ("b", 10, 30)]).validate(), Ok(()));
        assert!(plan(&[]).validate().is_err());
        assert!(plan(&[("a", 0, 10), ("b", 11, 30)]).validate().is_err());
        assert!(plan(&[("a", 1, 10)]).validate().is_err());
        assert!(plan(&[("a", 0, 10), ("a", 10, 30)]).validate().is_err());
        assert!(plan(&[("a", 0, 0)]).validate().is_err());
        let mut p = plan(&[("a", 0, 30)]);
        p.epoch = PlanEpoch(0);
        assert!(p.validate().is_err());
    }
}
