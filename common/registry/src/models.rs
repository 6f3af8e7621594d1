//! The plans of the models a cluster serves. The base model's (the one every coordinator's
//! `--model` names) is at `plan`; each model loaded at run time has its own at `models/<id>`,
//! committed by the same two-phase commit ([`crate::Registry::decide_commit`] with its
//! [`PlanKey`]). An unload deletes the model's plan and records `unloaded/<epoch>` in the same
//! transaction: nodes read that record and free their slices of the epoch.

use etcd_client::{Compare, CompareOp, TxnOp};
use proto_types::registry::{PlanRecord, UnloadRecord};
use proto_types::PlanEpoch;

use crate::{epoch_key, json, parse, valid_name, Registry, RegistryError, Result};

/// Which model's plan a key holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PlanKey {
    /// `plan`: the base model's.
    Base,
    /// `models/<id>`: a model loaded at run time.
    Model(String),
}

impl PlanKey {
    /// The key under the cluster's prefix.
    pub fn rest(&self) -> String {
        match self {
            PlanKey::Base => "plan".into(),
            PlanKey::Model(id) => format!("models/{id}"),
        }
    }
}

impl std::fmt::Display for PlanKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.rest())
    }
}

/// One model loaded at run time: its id, committed plan and the plan key's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPlan {
    /// The model's id (its file name without `.gguf`).
    pub id: String,
    /// Its committed plan.
    pub plan: PlanRecord,
    /// The revision of its key (the guard of its next decision, or of its unload).
    pub rev: i64,
}

fn checked(key: &str, v: &[u8]) -> Result<PlanRecord> {
    let p: PlanRecord = parse(key, v)?;
    p.validate().map_err(|reason| RegistryError::BadRecord {
        key: key.to_string(),
        reason,
    })?;
    Ok(p)
}

impl Registry {
    /// The committed plan at `key` and the key's revision, if any.
    pub async fn plan_at(&self, key: &PlanKey) -> Result<Option<(PlanRecord, i64)>> {
        let key = self.key(&key.rest());
        let Some((v, rev)) = self.get_one(&key).await? else {
            return Ok(None);
        };
        Ok(Some((checked(&key, &v)?, rev)))
    }

    /// The models loaded at run time, by id, and a line for each malformed record (skipped).
    pub async fn models(&self) -> Result<(Vec<ModelPlan>, Vec<String>)> {
        let prefix = self.key("models/");
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for (key, v, rev) in self.get_prefix(&prefix).await? {
            let id = key.strip_prefix(&prefix).unwrap_or_default().to_string();
            if !valid_name(&id) {
                bad.push(format!("etcd record {key}: `{id}` is not a model id"));
                continue;
            }
            match checked(&key, &v) {
                Ok(plan) => out.push(ModelPlan { id, plan, rev }),
                Err(e) => bad.push(e.to_string()),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((out, bad))
    }

    /// Unloads model `id`: deletes its plan, if its key is still at `rev`, and records
    /// `unloaded/<epoch>` in the same transaction, so that every node frees that epoch's
    /// slices. A plan that changed since it was read (a re-plan committed meanwhile) is a
    /// [`RegistryError::Conflict`]: read it again and retry.
    pub async fn unload_model(&self, id: &str, rev: i64, by: &str) -> Result<UnloadRecord> {
        let key = self.key(&PlanKey::Model(id.to_string()).rest());
        let Some((v, now)) = self.get_one(&key).await? else {
            return Err(RegistryError::Conflict(format!(
                "model `{id}` has no plan in etcd"
            )));
        };
        let plan: PlanRecord = parse(&key, &v)?;
        if now != rev {
            return Err(RegistryError::Conflict(format!(
                "the plan of `{id}` changed since it was read (revision {rev}, now {now})"
            )));
        }
        let rec = UnloadRecord {
            epoch: plan.epoch,
            model: id.to_string(),
            by: by.to_string(),
        };
        let gone = self.key(&format!("unloaded/{}", epoch_key(plan.epoch)));
        let txn = etcd_client::Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
            .and_then([
                TxnOp::delete(key.as_str(), None),
                TxnOp::put(gone.as_str(), json(&rec)?, None),
            ]);
        if self.txn(txn).await?.succeeded() {
            Ok(rec)
        } else {
            Err(RegistryError::Conflict(format!(
                "the plan of `{id}` changed while it was being unloaded"
            )))
        }
    }

    /// The epochs whose model was unloaded (their slices are to be freed).
    pub async fn unloaded(&self) -> Result<Vec<PlanEpoch>> {
        let prefix = self.key("unloaded/");
        let mut out = Vec::new();
        for (key, _, _) in self.get_prefix(&prefix).await? {
            match key
                .strip_prefix(&prefix)
                .and_then(|e| e.parse::<u64>().ok())
            {
                Some(e) => out.push(PlanEpoch(e)),
                None => {
                    return Err(RegistryError::BadRecord {
                        key,
                        reason: "not an epoch".into(),
                    })
                }
            }
        }
        Ok(out)
    }
}
