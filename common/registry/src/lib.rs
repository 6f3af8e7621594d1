//! [`Registry`]: a cluster's state in etcd: node membership, the committed plan, two-phase
//! commit decisions and drain requests. The key layout and the records are in
//! [`proto_types::registry`]; every read checks the record and reports a malformed one as
//! [`RegistryError::BadRecord`], so a bad value is ignored, never half-applied.
//!
//! The 2PC decision is made here: [`Registry::decide_commit`] writes the COMMIT decision and
//! the new plan in one etcd transaction, guarded on no decision for that epoch yet and on the
//! plan not having changed since it was read; [`Registry::decide_abort`] writes ABORT unless a
//! decision exists. Whichever is written first holds.
//!
//! # Layout
//! - [`Registry`]: the connection and its calls (this file).
//! - [`endpoints`]: one client per etcd member, calls pinned to one and failed over.
//! - [`metrics`]: its counts as Prometheus text.
//! - [`models`]: the plans of models loaded at run time, and their unloads.
//! - [`error`]: its error type, [`RegistryError`].

mod endpoints;
pub mod error;
pub mod metrics;
pub mod models;
pub mod tls;

pub use error::{RegistryError, Result};
pub use models::PlanKey;
pub use tls::EtcdTlsArgs;

/// The shortest TTL of an etcd lease this cluster takes (a node's registration, a
/// coordinator's leader lease), in seconds: keepalives go out every third of it, and a shorter
/// one lapses on a scheduling hiccup.
pub const MIN_TTL_SECS: i64 = 2;

use std::sync::Arc;

use endpoints::{Endpoints, Op};
use etcd_client::{
    Compare, CompareOp, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use proto_types::registry::*;
use proto_types::PlanEpoch;
use serde::de::DeserializeOwned;

/// A connection to etcd, scoped to one cluster's keys.
#[derive(Clone)]
pub struct Registry {
    endpoints: Arc<Endpoints>,
    cluster: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cluster", &self.cluster)
            .field("pinned", &self.endpoints.pinned())
            .finish()
    }
}

/// Checks a cluster or node name: letters, digits, `-`, `_`, `.`, `:` only, so that it is one
/// key segment.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

pub(crate) fn parse<T: DeserializeOwned>(key: &str, v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| RegistryError::BadRecord {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

pub(crate) fn epoch_key(epoch: PlanEpoch) -> String {
    // zero-padded so that keys sort by epoch
    format!("{:020}", epoch.0)
}

impl Registry {
    /// Connects to etcd at `url` (e.g. `http://127.0.0.1:2379`; several comma-separated, the
    /// nearest first: calls go to one member and move to the next when it fails).
    pub async fn connect(url: &str, cluster: &str) -> Result<Self> {
        if !valid_name(cluster) {
            return Err(RegistryError::Invalid(format!(
                "cluster name `{cluster}`: use letters, digits, '-', '_', '.' or ':'"
            )));
        }
        let urls: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(RegistryError::Invalid(format!(
                "no etcd endpoint in `{url}`: give one or more URLs, comma-separated"
            )));
        }
        let mut waiting = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(3))
            .with_tcp_keepalive(std::time::Duration::from_secs(10))
            .with_keep_alive(
                std::time::Duration::from_secs(2),
                std::time::Duration::from_secs(2),
            )
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls::options() {
            waiting = waiting.with_tls(tls);
        }
        let endpoints = Endpoints::new(
            &urls,
            waiting,
            std::time::Duration::from_secs(3),
            std::time::Duration::from_secs(5),
        )
        .await?;
        let r = Registry {
            endpoints: Arc::new(endpoints),
            cluster: cluster.to_string(),
        };
        // Fail now, not at the first use, when nothing answers.
        match r.read(|mut c| async move { c.status().await }).await {
            Ok(_) => Ok(r),
            Err(RegistryError::Etcd(source)) => Err(RegistryError::Unreachable {
                urls: urls.join(","),
                source,
            }),
            Err(e) => Err(e),
        }
    }

    /// What the client counted: the member in use, failovers, failed calls.
    pub fn etcd_stats(&self) -> metrics::EtcdStats {
        self.endpoints.stats()
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// `/<cluster>/<rest>`.
    pub fn key(&self, rest: &str) -> String {
        format!("/{}/{rest}", self.cluster)
    }

    /// A call that only reads (tried on the next member when one fails).
    async fn read<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.endpoints.call(Op::Read, f).await
    }

    /// A call that writes (tried on the next member only when it was never sent).
    pub(crate) async fn write<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.endpoints.call(Op::Write, f).await
    }

    /// A guarded transaction (a write).
    pub(crate) async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse> {
        self.write(|mut c| {
            let t = txn.clone();
            async move { c.txn(t).await }
        })
        .await
    }

    pub(crate) async fn get_one(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>> {
        let r = self
            .read(|mut c| async move { c.get(key, None).await })
            .await?;
        Ok(r.kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Every key under `prefix`, with its value and revision.
    pub(crate) async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>, i64)>> {
        let r = self
            .read(|mut c| async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await })
            .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                    kv.mod_revision(),
                )
            })
            .collect())
    }

    // --- leases ---

    /// Grants an etcd lease of `ttl_secs`.
    pub async fn grant(&self, ttl_secs: i64) -> Result<i64> {
        let r = self
            .write(|mut c| async move { c.lease_grant(ttl_secs, None).await })
            .await?;
        Ok(r.id())
    }

    /// Starts keeping `lease` alive: send with the keeper, read answers from the stream.
    pub async fn keep_alive(&self, lease: i64) -> Result<(LeaseKeeper, LeaseKeepAliveStream)> {
        self.read(|mut c| async move { c.lease_keep_alive(lease).await })
            .await
    }

    /// Revokes `lease`, deleting every key under it.
    pub async fn revoke(&self, lease: i64) -> Result<()> {
        self.write(|mut c| async move { c.lease_revoke(lease).await })
            .await?;
        Ok(())
    }

    // --- membership ---

    /// Registers a node under `lease`. A live node with the same id is a
    /// [`RegistryError::Conflict`], and its record is left as it is.
    pub async fn register(&self, node: &NodeRecord, lease: i64) -> Result<()> {
        if !valid_name(&node.id) {
            return Err(RegistryError::Invalid(format!(
                "node id `{}`: use letters, digits, '-', '_', '.' or ':'",
                node.id
            )));
        }
        let key = self.key(&format!("nodes/{}", node.id));
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                json(node)?,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let r = self.txn(txn).await?;
        if r.succeeded() {
            return Ok(());
        }
        let holder = r
            .op_responses()
            .into_iter()
            .find_map(|o| match o {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        Err(RegistryError::Conflict(format!(
            "node id `{}` is already registered: {holder}",
            node.id
        )))
    }

    /// Removes node `id`'s record.
    pub async fn deregister(&self, id: &str) -> Result<()> {
        let key = self.key(&format!("nodes/{id}"));
        self.write(|mut c| {
            let key = key.clone();
            async move { c.delete(key, None).await }
        })
        .await?;
        Ok(())
    }

    /// Node `id`'s record, if registered.
    pub async fn node(&self, id: &str) -> Result<Option<NodeRecord>> {
        let key = self.key(&format!("nodes/{id}"));
        match self.get_one(&key).await? {
            Some((v, _)) => Ok(Some(parse(&key, &v)?)),
            None => Ok(None),
        }
    }

    /// Registered nodes, by id, and a line for each malformed record (skipped).
    pub async fn members(&self) -> Result<(Vec<NodeRecord>, Vec<String>)> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for (key, v, _) in self.get_prefix(&self.key("nodes/")).await? {
            match parse::<NodeRecord>(&key, &v) {
                Ok(n) if key.ends_with(&format!("/{}", n.id)) => out.push(n),
                Ok(n) => bad.push(format!("etcd record {key}: it names node {}", n.id)),
                Err(e) => bad.push(e.to_string()),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((out, bad))
    }

    // --- plan and decisions ---

    /// The committed plan of the base model (the one `coordinator serve --model` names) and its
    /// key's revision (the guard of the next decision), if any. Models loaded at run time:
    /// [`Registry::plan_at`], [`Registry::models`].
    pub async fn plan(&self) -> Result<Option<(PlanRecord, i64)>> {
        self.plan_at(&PlanKey::Base).await
    }

    /// The decision of `epoch`, if one was written.
    pub async fn decision(&self, epoch: PlanEpoch) -> Result<Option<DecisionRecord>> {
        let key = self.key(&format!("txn/{}", epoch_key(epoch)));
        match self.get_one(&key).await? {
            Some((v, _)) => {
                let d: DecisionRecord = parse(&key, &v)?;
                if d.epoch != epoch {
                    return Err(RegistryError::BadRecord {
                        key,
                        reason: format!("it decides epoch {}", d.epoch),
                    });
                }
                Ok(Some(d))
            }
            None => Ok(None),
        }
    }

    /// The epoch a new plan takes, reserved for the caller: one past every plan, decision,
    /// unload and earlier reservation (`epoch`, written by a guarded transaction, so that two
    /// plan changes run at once, a re-plan and a model load, never share an epoch).
    pub async fn next_epoch(&self) -> Result<PlanEpoch> {
        let counter = self.key("epoch");
        loop {
            let mut top = 0u64;
            let (last, rev) = match self.get_one(&counter).await? {
                Some((v, rev)) => (parse::<PlanEpoch>(&counter, &v).map_or(0, |e| e.0), rev),
                None => (0, 0),
            };
            top = top.max(last);
            if let Some((v, _)) = self.get_one(&self.key("plan")).await? {
                // even a malformed plan's epoch, if readable, must not be reused
                if let Ok(p) = serde_json::from_slice::<PlanRecord>(&v) {
                    top = top.max(p.epoch.0);
                }
            }
            for (_, v, _) in self.get_prefix(&self.key("models/")).await? {
                if let Ok(p) = serde_json::from_slice::<PlanRecord>(&v) {
                    top = top.max(p.epoch.0);
                }
            }
            for prefix in ["txn/", "unloaded/"] {
                for (key, _, _) in self.get_prefix(&self.key(prefix)).await? {
                    if let Some(e) = key.rsplit('/').next().and_then(|e| e.parse::<u64>().ok()) {
                        top = top.max(e);
                    }
                }
            }
            let next =
                top.checked_add(1)
                    .map(PlanEpoch)
                    .ok_or_else(|| RegistryError::BadRecord {
                        key: self.key("txn/"),
                        reason: "the epochs are used up (a decision names the last one)".into(),
                    })?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    counter.as_str(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then([TxnOp::put(counter.as_str(), json(&next)?, None)]);
            if self.txn(txn).await?.succeeded() {
                return Ok(next);
            }
            // another plan change reserved one meanwhile: read again
        }
    }

    /// Writes the COMMIT decision of `plan` and `plan` itself (at `key`) in one transaction,
    /// guarded on no decision for its epoch yet and on the plan key still being at `plan_rev`
    /// (0: no plan yet). Returns the decision that holds: this one, or the one written first.
    pub async fn decide_commit(
        &self,
        key: &PlanKey,
        plan: &PlanRecord,
        plan_rev: i64,
        by: &str,
    ) -> Result<DecisionRecord> {
        plan.validate().map_err(|reason| {
            RegistryError::Invalid(format!("refusing to commit a bad plan: {reason}"))
        })?;
        let rec = DecisionRecord {
            epoch: plan.epoch,
            decision: Decision::Commit,
            by: by.to_string(),
        };
        let txn_key = self.key(&format!("txn/{}", epoch_key(plan.epoch)));
        let plan_key = self.key(&key.rest());
        let txn = Txn::new()
            .when([
                Compare::version(txn_key.as_str(), CompareOp::Equal, 0),
                Compare::mod_revision(plan_key.as_str(), CompareOp::Equal, plan_rev),
            ])
            .and_then([
                TxnOp::put(txn_key.as_str(), json(&rec)?, None),
                TxnOp::put(plan_key.as_str(), json(plan)?, None),
            ]);
        if self.txn(txn).await?.succeeded() {
            return Ok(rec);
        }
        match self.decision(plan.epoch).await? {
            Some(d) => Ok(d),
            None => Err(RegistryError::Conflict(format!(
                "the plan changed since it was read (revision {plan_rev}); epoch {} is not committed",
                plan.epoch
            ))),
        }
    }

    /// Writes the ABORT decision of `epoch` unless one exists; returns the decision that
    /// holds.
    pub async fn decide_abort(&self, epoch: PlanEpoch, by: &str) -> Result<DecisionRecord> {
        let rec = DecisionRecord {
            epoch,
            decision: Decision::Abort,
            by: by.to_string(),
        };
        let key = self.key(&format!("txn/{}", epoch_key(epoch)));
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), json(&rec)?, None)]);
        if self.txn(txn).await?.succeeded() {
            return Ok(rec);
        }
        self.decision(epoch).await?.ok_or_else(|| {
            RegistryError::Conflict(format!("the decision of epoch {epoch} vanished"))
        })
    }

    // --- draining ---

    /// Asks node `id` to leave, finishing its sessions by `deadline_unix_ms`.
    pub async fn request_leave(&self, id: &str, rec: &LeaveRecord) -> Result<()> {
        let (key, value) = (self.key(&format!("leaving/{id}")), json(rec)?);
        self.write(|mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.put(key, value, None).await }
        })
        .await?;
        Ok(())
    }

    /// Node `id`'s drain request, if any.
    pub async fn leave_request(&self, id: &str) -> Result<Option<LeaveRecord>> {
        let key = self.key(&format!("leaving/{id}"));
        match self.get_one(&key).await? {
            Some((v, _)) => Ok(Some(parse(&key, &v)?)),
            None => Ok(None),
        }
    }

    /// Ids of the nodes asked to leave (a malformed request still counts: the node leaves).
    pub async fn leaving(&self) -> Result<Vec<String>> {
        let prefix = self.key("leaving/");
        Ok(self
            .get_prefix(&prefix)
            .await?
            .into_iter()
            .filter_map(|(k, _, _)| k.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// Removes node `id`'s drain request.
    pub async fn clear_leave(&self, id: &str) -> Result<()> {
        let key = self.key(&format!("leaving/{id}"));
        self.write(|mut c| {
            let key = key.clone();
            async move { c.delete(key, None).await }
        })
        .await?;
        Ok(())
    }

    // --- the coordinators' leader election ---

    /// Waits until this caller (`who`, under its etcd leader lease `lease`) leads the election
    /// of the coordinator that runs re-plans.
    pub async fn campaign(&self, who: &str, lease: i64) -> Result<()> {
        let key = self.key("election");
        // A campaign waits as long as another leads, on the member in use when it began:
        // when the pin moves (that member failed a call), it is ended to start again there.
        let moved = self.endpoints.moved().notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        let campaign = self.endpoints.call_waiting(Op::Write, |mut c| {
            let key = key.clone();
            async move { c.campaign(key, who, lease).await }
        });
        tokio::select! {
            r = campaign => r?,
            _ = moved => return Err(RegistryError::MemberChanged),
        };
        Ok(())
    }

    /// Writes a raw value (tests and repair tools).
    pub async fn put_raw(&self, rest: &str, value: &[u8]) -> Result<()> {
        let key = self.key(rest);
        self.write(|mut c| {
            let key = key.clone();
            async move { c.put(key, value, None).await }
        })
        .await?;
        Ok(())
    }
}
