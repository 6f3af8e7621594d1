//! The shard node's domain: what it holds and who owns each piece. No transport and no async
//! runtime here: the tarpc server (`crate::server`) and the etcd membership
//! (`crate::membership`) call [`Node`]'s methods, and errors leave as [`NodeError`], turned
//! into wire errors only at the RPC edge.
//!
//! # Layout
//! - [`config`]: [`NodeConfig`], the typed, checked configuration.
//! - [`leases`]: the connection lease table ([`Leases`]) and activation charges.
//! - [`slices`]: the slice state machine, PREPARE → COMMIT → retire → free ([`SliceTable`]).
//! - [`sessions`]: a session's KV cache and sampler ([`SessionEntry`]).
//! - [`accounting`]: bytes per lease and kind, and the memory report.
//! - [`error`]: its error type, [`NodeError`].
//!
//! # Where memory is freed
//! [`Node::release_lease`] frees everything a connection lease owns: its sessions (their KV
//! caches) and its slices (their weights). The server calls it when the connection closes,
//! [`Node::expire`] when a lease's TTL passes. A session's cache and a slice's weights are
//! freed when the last `Arc` to them drops: a forward pass in flight holds them until it ends.
//!
//! # The four leases
//! - A *connection lease* ([`LeaseId`]): one per client connection, granted in its handshake,
//!   renewed by heartbeats; it owns what that client created.
//! - The *plan owner*: a connection lease the node grants to itself while it is registered in
//!   etcd. Committed slices belong to it (to the plan, not to the coordinator that loaded
//!   them), so a coordinator crash does not unload the cluster.
//! - The *registration lease*: etcd's lease on the node's record (`crate::membership`).
//! - The *leader lease*: etcd's lease on the coordinator's election key (coordinator crate).
//!
//! # Locks
//! Slices, sessions and the plan owner live under one lock ([`Node`]'s `held`), so a check
//! against the memory limit and the insert it allows are one step. The lease table has its own
//! lock, which is only ever taken inside `held` or alone (lock order: `held`, then the lease
//! table). A session's own lock (held by a forward pass) is never taken under `held`.

pub mod accounting;
pub mod config;
pub mod error;
pub mod leases;
pub mod outbox;
pub mod sessions;
pub mod slices;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Device;
use common::model::LayerRange;
use common::telemetry::SPAN_EVENT;
use proto_types::{LeaseId, PlanEpoch, SessionId};

pub use accounting::{report, Report};
pub use config::{Activations, NodeConfig};
pub use error::{NodeError, Result};
pub use leases::{Charge, Leases};
pub use outbox::Outbox;
pub use sessions::{now_ms, Session, SessionEntry, Slice};
pub use slices::{SliceState, SliceTable};

/// Locks a mutex, recovering from poisoning (a panic elsewhere must not wedge the node).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes one lease holds, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// The lease (`None`: the node's own, outside every lease).
    pub lease: Option<LeaseId>,
    /// Its client.
    pub client: String,
    /// Committed slices.
    pub weights: u64,
    /// Prepared, uncommitted slices.
    pub prepared: u64,
    /// KV caches.
    pub kv_cache: u64,
    /// Activations queued, computing or relayed.
    pub activations: u64,
    /// Prefix-cache entries.
    pub prefix_cache: u64,
}

impl Held {
    /// All kinds.
    pub fn total(&self) -> u64 {
        self.weights + self.prepared + self.kv_cache + self.activations + self.prefix_cache
    }
}

/// What the node holds, under one lock.
#[derive(Debug, Default)]
struct Holdings {
    slices: SliceTable<Slice>,
    sessions: HashMap<SessionId, Arc<SessionEntry>>,
    /// In a cluster: the plan owner (see the module docs).
    plan_owner: Option<LeaseId>,
}

impl Holdings {
    /// Slices plus every session's most KV bytes: what the memory limit must leave room for.
    fn reserved(&self) -> u64 {
        self.slices.bytes() + self.sessions.values().map(|s| s.max_kv_bytes).sum::<u64>()
    }

    /// Frees retiring slices no session runs on any more.
    fn collect_retired(&mut self) -> bool {
        let live: HashSet<PlanEpoch> = self.sessions.values().map(|s| s.epoch).collect();
        let freed = self.slices.collect(&live);
        for (epoch, bytes) in &freed {
            tracing::info!(%epoch, bytes, "retired slice freed: its last session ended");
        }
        !freed.is_empty()
    }
}

/// A shard node's slices and sessions, each owned by a lease.
#[derive(Debug)]
pub struct Node {
    /// Configuration.
    pub cfg: NodeConfig,
    /// The opened device.
    pub device: Device,
    /// Connection leases.
    pub leases: Leases,
    baseline: u64,
    held: Mutex<Holdings>,
    node_id: Mutex<Option<String>>,
    left: AtomicBool,
    freed: AtomicBool,
    leases_released: AtomicU64,
}

impl Node {
    /// A node with nothing loaded. The device's bytes in use now are the runtime's own
    /// baseline (see [`common::memory::in_use`]).
    pub fn new(cfg: NodeConfig, device: Device) -> Self {
        Node {
            baseline: common::memory::in_use(&device),
            leases: Leases::new(cfg.lease_ttl),
            cfg,
            device,
            held: Mutex::default(),
            node_id: Mutex::new(None),
            left: AtomicBool::new(false),
            freed: AtomicBool::new(false),
            leases_released: AtomicU64::new(0),
        }
    }

    /// Bytes in use at start-up, before any slice.
    pub fn baseline(&self) -> u64 {
        self.baseline
    }

    /// Connection leases released so far (closed, expired or left).
    pub fn leases_released(&self) -> u64 {
        self.leases_released.load(Ordering::Relaxed)
    }

    /// Whether anything was freed since the last call (the server then hands memory back).
    pub fn take_freed(&self) -> bool {
        self.freed.swap(false, Ordering::Relaxed)
    }

    fn mark_freed(&self) {
        self.freed.store(true, Ordering::Relaxed);
    }

    /// Ends `lease` and frees everything it owns: its sessions and its slices. Returns the
    /// bytes freed (an unknown lease frees nothing).
    pub fn release_lease(&self, lease: LeaseId, why: &str) -> u64 {
        // A trace of its own (or a part of the caller's), with what was freed as events.
        let _span = tracing::info_span!("release lease", %lease, why).entered();
        let mut h = lock(&self.held);
        let client = self.leases.remove(lease).unwrap_or_default();
        let mut kv = 0u64;
        let mut n = 0;
        h.sessions.retain(|_, s| {
            let keep = s.lease != lease;
            if !keep {
                kv += s.kv_bytes.load(Ordering::Relaxed);
                n += 1;
            }
            keep
        });
        let owner = h.plan_owner;
        let (weights, orphaned) = h.slices.release(lease, owner);
        for epoch in orphaned {
            tracing::info!(%epoch, "prepared slice orphaned; etcd's decision resolves it");
        }
        if owner == Some(lease) {
            h.plan_owner = None;
        }
        h.collect_retired();
        drop(h);
        self.leases_released.fetch_add(1, Ordering::Relaxed);
        self.mark_freed();
        tracing::info!(target: SPAN_EVENT, kind = "kv_cache", bytes = kv, sessions = n, why, "freed");
        tracing::info!(target: SPAN_EVENT, kind = "weights", bytes = weights, why, "freed");
        tracing::info!(%lease, client, why, sessions = n, kv_bytes = kv, weight_bytes = weights, "lease released");
        kv + weights
    }

    /// Releases leases past their TTL and closes sessions idle longer than
    /// [`NodeConfig::session_idle`] (as of `now_ms`, in [`now_ms`]'s clock).
    pub fn expire(&self, now_ms: u64) {
        for lease in self.leases.expired() {
            self.release_lease(lease, "no heartbeat within the TTL");
        }
        let idle = self.cfg.session_idle.as_millis() as u64;
        let mut h = lock(&self.held);
        let mut closed = Vec::new();
        h.sessions.retain(|&id, s| {
            let keep = s.prefix_cache
                || now_ms.saturating_sub(s.last_used_ms.load(Ordering::Relaxed)) <= idle;
            if !keep {
                closed.push((id, s.kv_bytes.load(Ordering::Relaxed)));
            }
            keep
        });
        if h.collect_retired() {
            self.mark_freed();
        }
        drop(h);
        if !closed.is_empty() {
            let _span = tracing::info_span!("close idle sessions", n = closed.len()).entered();
            for (id, bytes) in closed {
                self.mark_freed();
                tracing::info!(session = %id, kind = "kv_cache", bytes, "idle session closed");
            }
        }
    }

    /// The committed slice of `epoch` (served or retiring): what its sessions run on.
    pub fn slice_for(&self, epoch: PlanEpoch) -> Result<Arc<Slice>> {
        lock(&self.held).slices.committed(epoch)
    }

    /// The served slice, if any.
    pub fn slice(&self) -> Option<Arc<Slice>> {
        lock(&self.held).slices.served().map(|(_, s)| s.clone())
    }

    /// Every slice held: epoch, model, blocks, state and bytes, oldest first.
    pub fn slices_held(&self) -> Vec<(PlanEpoch, String, LayerRange, SliceState, u64)> {
        let h = lock(&self.held);
        let mut v: Vec<_> = h
            .slices
            .entries()
            .map(|(e, s)| {
                (
                    e,
                    s.slice.model.clone(),
                    s.slice.stage.range(),
                    s.state,
                    s.bytes,
                )
            })
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    /// Epochs and states of every slice held, oldest first.
    pub fn slice_states(&self) -> Vec<(PlanEpoch, SliceState)> {
        lock(&self.held).slices.states()
    }

    /// The slice of `epoch` if one with this model and range is held already, in any state (a
    /// repeated load or PREPARE reuses it); a different one is an error.
    pub fn held_slice(
        &self,
        epoch: PlanEpoch,
        model: &str,
        range: LayerRange,
    ) -> Result<Option<Arc<Slice>>> {
        match lock(&self.held).slices.get(epoch) {
            None => Ok(None),
            Some(e) if e.slice.model == model && e.slice.stage.range() == range => {
                Ok(Some(e.slice.clone()))
            }
            Some(e) => Err(NodeError::OtherSlice {
                epoch,
                model: e.slice.model.clone(),
                layers: e.slice.stage.range().to_string(),
            }),
        }
    }

    /// Installs a slice owned by `lease`, committed (served at once) or prepared (PREPARE,
    /// which also checks that it fits beside what is held, and that its epoch is newer than
    /// the served one). `beside`: served beside other models' slices (see
    /// [`proto_types::LoadSlice::beside`]).
    pub fn put_slice(
        &self,
        lease: LeaseId,
        slice: Slice,
        committed: bool,
        beside: bool,
    ) -> Result<()> {
        let mut h = lock(&self.held);
        // under the lock: `leave` sets the flag before it takes the lock to clear everything
        if self.has_left() {
            return Err(NodeError::Left);
        }
        self.leases.check(lease)?;
        let epoch = slice.epoch;
        let bytes = slice.stage.weight_bytes() as u64;
        let group = beside.then(|| slice.model.clone());
        if !committed {
            if let Some(limit) = self.cfg.memory_limit {
                let held = h.reserved();
                if h.slices.get(epoch).is_none() && held + bytes > limit {
                    return Err(NodeError::SliceDoesNotFit {
                        epoch,
                        bytes,
                        held,
                        limit,
                    });
                }
            }
        }
        h.slices
            .prepare(epoch, Arc::new(slice), bytes, lease, !committed, group)?;
        if committed {
            let owner = h.plan_owner;
            if let Err(e) = h.slices.commit(epoch, owner) {
                h.slices.abort(epoch)?;
                return Err(e);
            }
            // the slice it replaced goes now if no session runs on it
            if h.collect_retired() {
                self.mark_freed();
            }
        }
        Ok(())
    }

    /// Makes the prepared slice of `epoch` the served one (idempotent). The slice served so far
    /// retires: its sessions finish on it, then it is freed. Prepared slices of older epochs
    /// are dropped.
    pub fn commit(&self, epoch: PlanEpoch) -> Result<()> {
        let mut h = lock(&self.held);
        let owner = h.plan_owner;
        h.slices.commit(epoch, owner)?;
        if h.collect_retired() {
            self.mark_freed();
        }
        Ok(())
    }

    /// ABORT: frees the prepared slice of `epoch`; returns its bytes (0 if none: idempotent).
    pub fn abort(&self, epoch: PlanEpoch) -> Result<u64> {
        let bytes = lock(&self.held).slices.abort(epoch)?;
        if bytes > 0 {
            self.mark_freed();
        }
        Ok(bytes)
    }

    /// Retires the served slice of `model` if it is older than `epoch` (a plan of that model
    /// which this node is not part of was committed).
    pub fn retire_before(&self, epoch: PlanEpoch, model: &str) {
        let mut h = lock(&self.held);
        if h.slices.retire_before(epoch, model) {
            tracing::info!(%epoch, model, "this node is not in plan {epoch}: its slice retires");
            if h.collect_retired() {
                self.mark_freed();
            }
        }
    }

    /// Retires the served slice of `epoch` (`why`: its model was unloaded, or re-planned
    /// without this node): it is freed once its sessions end.
    pub fn retire_epoch(&self, epoch: PlanEpoch, why: &str) {
        let mut h = lock(&self.held);
        if h.slices.retire(epoch) {
            tracing::info!(%epoch, why, "slice retires");
            if h.collect_retired() {
                self.mark_freed();
            }
        }
    }

    /// Drops the slice of `epoch` (prepared or committed) and its sessions; returns its bytes.
    pub fn drop_slice(&self, epoch: PlanEpoch) -> Result<u64> {
        let mut h = lock(&self.held);
        let bytes = h.slices.remove(epoch)?;
        h.sessions.retain(|_, s| s.epoch != epoch);
        self.mark_freed();
        Ok(bytes)
    }

    /// Bytes held for each lease, by kind (every live lease, even if it holds nothing).
    pub fn held(&self) -> Vec<Held> {
        let h = lock(&self.held);
        let mut m: HashMap<LeaseId, Held> = self
            .leases
            .list()
            .into_iter()
            .map(|(id, client, activations)| {
                let held = Held {
                    lease: Some(id),
                    client,
                    activations,
                    ..Default::default()
                };
                (id, held)
            })
            .collect();
        let mut orphan = Held::default();
        for (_, e) in h.slices.entries() {
            let to = m.get_mut(&e.lease).unwrap_or(&mut orphan);
            if e.state.is_prepared() {
                to.prepared += e.bytes;
            } else {
                to.weights += e.bytes;
            }
        }
        for s in h.sessions.values() {
            let to = m.get_mut(&s.lease).unwrap_or(&mut orphan);
            let bytes = s.kv_bytes.load(Ordering::Relaxed);
            if s.prefix_cache {
                to.prefix_cache += bytes;
            } else {
                to.kv_cache += bytes;
            }
        }
        drop(h);
        let mut v: Vec<Held> = m.into_values().collect();
        v.sort_by_key(|h| h.lease);
        if orphan.total() > 0 {
            v.push(orphan);
        }
        v
    }

    /// Free bytes for the planner: the limit (or the device's total) less what is reserved.
    pub fn free_bytes(&self) -> (u64, u64) {
        let (dev_free, dev_total) =
            common::memory::device_memory(&self.device).unwrap_or((u64::MAX, u64::MAX));
        match self.cfg.memory_limit {
            Some(limit) => (limit.saturating_sub(lock(&self.held).reserved()), limit),
            None => (dev_free, dev_total),
        }
    }

    /// Bytes of the served and retiring slices (freed once a newer plan commits and their
    /// sessions end).
    pub fn serving_bytes(&self) -> u64 {
        lock(&self.held).slices.committed_bytes()
    }

    /// Opens a session, within the session bound and the memory limit: the check and the
    /// insert are one step under the node's lock, so concurrent opens cannot both pass it.
    pub fn open_session(&self, id: SessionId, s: SessionEntry) -> Result<Arc<SessionEntry>> {
        let mut h = lock(&self.held);
        if self.has_left() {
            return Err(NodeError::Left);
        }
        self.leases.check(s.lease)?;
        // The slice was looked up before the cache was built and the next stage reached; a
        // commit may have retired and freed it meanwhile: a session on it would keep its
        // weights alive, outside every count.
        h.slices.committed(s.epoch)?;
        if h.sessions.contains_key(&id) {
            return Err(NodeError::SessionOpen(id));
        }
        let running = h.sessions.values().filter(|s| !s.prefix_cache).count();
        if !s.prefix_cache && running >= self.cfg.max_sessions {
            return Err(NodeError::TooManySessions(running));
        }
        self.room_for(&h, s.max_kv_bytes)?;
        let s = Arc::new(s);
        h.sessions.insert(id, s.clone());
        Ok(s)
    }

    /// Whether a session reserving `kv_bytes` fits the memory limit now: a fork checks
    /// before it copies a cache (`open_session` checks again as it inserts).
    pub fn session_fits(&self, kv_bytes: u64) -> Result<()> {
        self.room_for(&lock(&self.held), kv_bytes)
    }

    fn room_for(&self, h: &Holdings, kv_bytes: u64) -> Result<()> {
        if let Some(limit) = self.cfg.memory_limit {
            let reserved = h.reserved();
            if reserved + kv_bytes > limit {
                return Err(NodeError::SessionDoesNotFit {
                    kv_bytes,
                    reserved,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// A session by id.
    pub fn session(&self, id: SessionId) -> Result<Arc<SessionEntry>> {
        lock(&self.held)
            .sessions
            .get(&id)
            .cloned()
            .ok_or(NodeError::UnknownSession {
                id,
                owner: None,
                left: self.has_left(),
            })
    }

    /// Closes a session owned by `lease`; its cache is freed when the last reference goes.
    /// Returns the bytes its cache held.
    pub fn close_session(&self, id: SessionId, lease: LeaseId) -> Result<u64> {
        let mut h = lock(&self.held);
        match h.sessions.get(&id).map(|s| s.lease) {
            None => Err(NodeError::UnknownSession {
                id,
                owner: None,
                left: false,
            }),
            Some(o) if o != lease => Err(NodeError::UnknownSession {
                id,
                owner: Some(lease),
                left: false,
            }),
            Some(_) => {
                let bytes = h
                    .sessions
                    .remove(&id)
                    .map_or(0, |s| s.kv_bytes.load(Ordering::Relaxed));
                h.collect_retired();
                self.mark_freed();
                Ok(bytes)
            }
        }
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.held)
            .sessions
            .values()
            .filter(|s| !s.prefix_cache)
            .count()
    }

    /// The node's id in etcd, once registered.
    pub fn node_id(&self) -> Option<String> {
        lock(&self.node_id).clone()
    }

    /// Whether the node has left its cluster (it takes no new slices).
    pub fn has_left(&self) -> bool {
        self.left.load(Ordering::Relaxed)
    }

    /// Joins a cluster as `id`: grants the plan owner (to which committed slices pass) and
    /// returns it.
    pub fn join_cluster(&self, id: &str, client: String) -> LeaseId {
        let owner = self.leases.grant(client);
        let mut h = lock(&self.held);
        h.plan_owner = Some(owner);
        h.slices.pass_committed_to(owner);
        drop(h);
        *lock(&self.node_id) = Some(id.to_string());
        owner
    }

    /// Renews the plan owner with the registration's keepalive; grants a fresh one if it had
    /// expired (what it held was freed then). Returns the owner now in place.
    pub fn renew_plan_owner(&self, client: impl FnOnce() -> String) -> Option<LeaseId> {
        let mut h = lock(&self.held);
        if self.has_left() {
            return None;
        }
        let old = h.plan_owner;
        if old.is_some_and(|l| self.leases.renew(l).is_ok()) {
            return old;
        }
        let fresh = self.leases.grant(client());
        tracing::warn!(?old, %fresh, "the plan owner had expired; granted a new one");
        h.plan_owner = Some(fresh);
        h.slices.pass_committed_to(fresh);
        Some(fresh)
    }

    /// Leaves the cluster: takes nothing new, frees every slice and session and ends the plan
    /// owner. Returns the bytes freed.
    pub fn leave(&self, why: &str) -> u64 {
        self.left.store(true, Ordering::Relaxed);
        let mut h = lock(&self.held);
        let kv: u64 = h
            .sessions
            .drain()
            .map(|(_, s)| s.kv_bytes.load(Ordering::Relaxed))
            .sum();
        let w = h.slices.clear();
        if let Some(owner) = h.plan_owner.take() {
            self.leases.remove(owner);
        }
        drop(h);
        self.mark_freed();
        tracing::info!(why, kv_bytes = kv, weight_bytes = w, "everything released");
        kv + w
    }
}

#[cfg(test)]
mod tests;
