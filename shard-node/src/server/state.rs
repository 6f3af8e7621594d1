//! [`Node`]: what a shard node holds (slices, sessions) and who owns each of them (leases).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::device::DeviceSpec;
use common::model::{KvCache, LayerRange, Stage};
use common::sampling::Sampler;
use proto_types::{ErrorCode, LeaseId, PlanEpoch, SessionId, ShardError};
use tokio::sync::mpsc;

use super::batch::Onward;
use super::compute::Compute;
use super::lease::Leases;
use super::metrics::Metrics;
use super::peer::PeerPool;

/// Typed node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where model files are looked up by name.
    pub models_dir: PathBuf,
    /// The device.
    pub device: DeviceSpec,
    /// Most bytes the node may hold (weights plus caches); `None`: no limit.
    pub memory_limit: Option<u64>,
    /// Most sessions at once.
    pub max_sessions: usize,
    /// Advertised heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Lease time-to-live.
    pub lease_ttl: Duration,
    /// A session with no step for this long is closed.
    pub session_idle: Duration,
    /// Hand freed heap memory back to the OS (`malloc_trim`) after frees.
    pub trim: bool,
    /// How long the compute thread polls for the next step after a pass before it sleeps.
    pub poll: Duration,
}

/// The longest `--poll-us`.
const MAX_POLL: Duration = Duration::from_secs(1);

impl NodeConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_sessions == 0 {
            return Err("--max-sessions must be at least 1".into());
        }
        if self.heartbeat_interval.is_zero() || self.lease_ttl <= self.heartbeat_interval {
            return Err(format!(
                "the lease TTL ({:?}) must be longer than the heartbeat interval ({:?}), which must not be 0",
                self.lease_ttl, self.heartbeat_interval
            ));
        }
        if self.session_idle.is_zero() {
            return Err("--session-idle-secs must be at least 1".into());
        }
        if self.poll > MAX_POLL {
            return Err(format!(
                "--poll-us must be at most {} (a second): the compute thread spins that long after every pass",
                MAX_POLL.as_micros()
            ));
        }
        Ok(())
    }
}

/// A loaded slice.
#[derive(Debug)]
pub struct Slice {
    /// Its epoch.
    pub epoch: PlanEpoch,
    /// The model file name.
    pub model: String,
    /// The stage.
    pub stage: Stage,
}

/// Where a slice is in the two-phase commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceState {
    /// Loaded by PREPARE, waiting for the decision (since then).
    Prepared(Instant),
    /// Committed: new sessions open on it.
    Serving,
    /// Committed, then replaced by a newer epoch: sessions already on it finish on it, and
    /// it is freed once the last one has.
    Retiring,
}

/// A slice with its owner.
#[derive(Debug)]
struct SliceEntry {
    slice: Arc<Slice>,
    lease: LeaseId,
    state: SliceState,
}

/// One session's state on this node, locked by the compute thread while a step runs.
#[derive(Debug)]
pub struct Session {
    /// The slice it runs on.
    pub slice: Arc<Slice>,
    /// Its keys and values.
    pub cache: KvCache,
    /// The next stage's address, if any.
    pub next: Option<String>,
    /// The last stage's sampler.
    pub sampler: Sampler,
}

/// A session with what accounting and expiry read without taking its lock (which a forward
/// pass holds for as long as it runs).
#[derive(Debug)]
pub struct SessionEntry {
    /// Owner.
    pub lease: LeaseId,
    /// The slice's epoch it runs on.
    pub epoch: PlanEpoch,
    /// Its most bytes of KV cache (reserved against the memory limit when opened).
    pub max_kv_bytes: u64,
    /// Bytes its cache holds now (updated by the compute thread).
    pub kv_bytes: AtomicU64,
    /// When it last ran a step, in [`now_ms`].
    pub last_used_ms: AtomicU64,
    /// The state.
    pub state: Mutex<Session>,
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
}

impl Held {
    /// All kinds.
    pub fn total(&self) -> u64 {
        self.weights + self.prepared + self.kv_cache + self.activations
    }
}

/// Shared state of the node.
#[derive(Debug)]
pub struct Node {
    /// Configuration.
    pub cfg: NodeConfig,
    /// The opened device.
    pub device: Device,
    /// The compute thread.
    pub compute: Compute,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Connections to next stages.
    pub peers: Arc<PeerPool>,
    /// Owners.
    pub leases: Leases,
    /// Bytes in use at start-up, before any slice: the runtime's own baseline (see
    /// [`common::memory::in_use`]).
    pub baseline: u64,
    slices: Mutex<HashMap<PlanEpoch, SliceEntry>>,
    sessions: Mutex<HashMap<SessionId, Arc<SessionEntry>>>,
    /// In a cluster (etcd): the node's membership lease, renewed while its etcd registration
    /// lives. Committed slices belong to it (to the plan, not to the coordinator that
    /// loaded them), and prepared slices pass to it when their coordinator goes away, until
    /// etcd's decision resolves them.
    plan_lease: Mutex<Option<LeaseId>>,
    /// The node's id in etcd, once registered.
    pub node_id: Mutex<Option<String>>,
    /// Set once the node has left its cluster: it takes no new slices.
    pub left: AtomicBool,
    freed: AtomicBool,
    trim_until: Mutex<Option<Instant>>,
}

/// How long after a free the reaper keeps handing memory back.
const TRIM_WINDOW: Duration = Duration::from_secs(2);

/// Milliseconds since the first call (the clock of [`SessionEntry::last_used_ms`]).
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Locks a mutex, recovering from poisoning (a panic elsewhere must not wedge the node).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(code: ErrorCode, d: impl Into<String>) -> ShardError {
    ShardError::new(code, d)
}

impl Node {
    /// A node with nothing loaded, and the receiving end of its compute thread's onward
    /// traffic (to be run by [`super::relay::run`]).
    pub fn new(
        cfg: NodeConfig,
        device: Device,
    ) -> std::io::Result<(Self, mpsc::UnboundedReceiver<Onward>)> {
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let baseline = common::memory::in_use(&device);
        let poll = cfg.poll;
        let node = Node {
            baseline,
            leases: Leases::new(cfg.lease_ttl),
            cfg,
            compute: Compute::start(tx, metrics.clone(), device.is_cpu(), poll)?,
            device,
            metrics,
            peers: Arc::new(PeerPool::default()),
            slices: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            plan_lease: Mutex::new(None),
            node_id: Mutex::new(None),
            left: AtomicBool::new(false),
            freed: AtomicBool::new(false),
            trim_until: Mutex::new(None),
        };
        Ok((node, rx))
    }

    /// Ends `lease` and frees everything it owns: its sessions and its slices. Returns the
    /// bytes freed (an unknown lease frees nothing).
    pub fn release_lease(&self, lease: LeaseId, why: &str) -> u64 {
        let client = self.leases.remove(lease).unwrap_or_default();
        let mut kv = 0u64;
        let mut n = 0;
        lock(&self.sessions).retain(|_, s| {
            if s.lease == lease {
                kv += s.kv_bytes.load(Ordering::Relaxed);
                n += 1;
                false
            } else {
                true
            }
        });
        let mut weights = 0u64;
        let plan_lease = *lock(&self.plan_lease);
        lock(&self.slices).retain(|&epoch, e| {
            if e.lease != lease {
                return true;
            }
            match (e.state, plan_lease) {
                // In a cluster, a prepared slice outlives its coordinator until etcd's
                // decision (or the prepare timeout) resolves it.
                (SliceState::Prepared(_), Some(p)) if p != lease => {
                    tracing::info!(%epoch, "prepared slice orphaned; etcd's decision resolves it");
                    e.lease = p;
                    true
                }
                _ => {
                    weights += e.slice.stage.weight_bytes() as u64;
                    false
                }
            }
        });
        if plan_lease == Some(lease) {
            *lock(&self.plan_lease) = None;
        }
        self.gc_retiring();
        self.metrics.leases_released.fetch_add(1, Ordering::Relaxed);
        self.freed.store(true, Ordering::Relaxed);
        tracing::info!(%lease, client, why, sessions = n, kv_bytes = kv, weight_bytes = weights, "lease released");
        kv + weights
    }

    /// Releases leases past their TTL and closes sessions idle too long; trims the heap and
    /// the device's memory pool if anything was freed lately. Run periodically, off the async
    /// workers (a pool trim waits for the device).
    pub fn reap(&self) {
        for lease in self.leases.expired() {
            self.release_lease(lease, "no heartbeat within the TTL");
        }
        self.gc_retiring();
        let idle = self.cfg.session_idle.as_millis() as u64;
        let now = Instant::now();
        let now_ms = now_ms();
        let mut closed = Vec::new();
        lock(&self.sessions).retain(|&id, s| {
            let keep = now_ms.saturating_sub(s.last_used_ms.load(Ordering::Relaxed)) <= idle;
            if !keep {
                closed.push((id, s.kv_bytes.load(Ordering::Relaxed)));
            }
            keep
        });
        for (id, bytes) in closed {
            self.freed.store(true, Ordering::Relaxed);
            tracing::info!(session = %id, bytes, "idle session closed");
        }
        // What was removed here may still be in use for a moment (a batch in flight holds
        // its sessions and slice), so trim for a while after each free, not just once.
        let mut until = lock(&self.trim_until);
        if self.freed.swap(false, Ordering::Relaxed) {
            *until = Some(now + TRIM_WINDOW);
            if self.session_count() == 0 {
                // The compute thread's scratch buffers (head logits, products) are kept
                // between steps; with no session left they go too, before the trims below.
                self.compute
                    .post(common::model::linear::release_host_scratch);
            }
        }
        match *until {
            Some(t) if now <= t => {
                if self.cfg.trim {
                    super::trim::release_free_memory();
                }
                // Device buffers go back to the driver whatever --no-malloc-trim says: a
                // cached pool is exactly the leak this node exists to avoid.
                if let Some((before, after)) = common::memory::release_device_cache(&self.device) {
                    if after.reserved < before.reserved {
                        tracing::info!(
                            released = before.reserved - after.reserved,
                            reserved = after.reserved,
                            used = after.used,
                            "device pool memory handed back to the driver"
                        );
                    }
                }
            }
            _ => *until = None,
        }
    }

    /// The committed slice of `epoch` (served or retiring): what its sessions run on.
    pub fn slice_for(&self, epoch: PlanEpoch) -> Result<Arc<Slice>, ShardError> {
        let slices = lock(&self.slices);
        if let Some(e) = slices.get(&epoch) {
            if e.state == SliceState::Serving || e.state == SliceState::Retiring {
                return Ok(e.slice.clone());
            }
        }
        match slices.values().find(|e| e.state == SliceState::Serving) {
            Some(s) => Err(err(
                ErrorCode::EpochMismatch,
                format!("this node serves epoch {}, not {epoch}", s.slice.epoch),
            )),
            None => Err(err(
                ErrorCode::NoSlice,
                format!("no slice is committed for epoch {epoch}"),
            )),
        }
    }

    /// The served slice, if any.
    pub fn slice(&self) -> Option<Arc<Slice>> {
        lock(&self.slices)
            .values()
            .filter(|e| e.state == SliceState::Serving)
            .max_by_key(|e| e.slice.epoch)
            .map(|e| e.slice.clone())
    }

    /// Epochs and states of every slice held, oldest first.
    pub fn slice_states(&self) -> Vec<(PlanEpoch, SliceState)> {
        let mut v: Vec<_> = lock(&self.slices)
            .iter()
            .map(|(&e, s)| (e, s.state))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    /// The slice of `epoch` if one with this model and range is held already, in any state (a
    /// repeated load or PREPARE reuses it); a different one is an error.
    pub fn held_slice(
        &self,
        epoch: PlanEpoch,
        model: &str,
        range: LayerRange,
    ) -> Result<Option<Arc<Slice>>, ShardError> {
        match lock(&self.slices).get(&epoch) {
            None => Ok(None),
            Some(e) if e.slice.model == model && e.slice.stage.range() == range => {
                Ok(Some(e.slice.clone()))
            }
            Some(e) => Err(err(
                ErrorCode::InvalidArgument,
                format!(
                    "epoch {epoch} already has a slice of {} blocks {} here",
                    e.slice.model,
                    e.slice.stage.range()
                ),
            )),
        }
    }

    /// Sets the membership lease (in a cluster): committed slices pass to it.
    pub fn set_plan_lease(&self, lease: Option<LeaseId>) {
        *lock(&self.plan_lease) = lease;
        if let Some(p) = lease {
            for e in lock(&self.slices).values_mut() {
                if !matches!(e.state, SliceState::Prepared(_)) {
                    e.lease = p;
                }
            }
        }
    }

    /// Installs a slice owned by `lease`, committed (served at once) or prepared (PREPARE,
    /// which also checks that it fits beside what is held, and that its epoch is newer than
    /// the served one).
    pub fn put_slice(
        &self,
        lease: LeaseId,
        slice: Slice,
        committed: bool,
    ) -> Result<(), ShardError> {
        self.leases.check(lease)?;
        if self.left.load(Ordering::Relaxed) {
            return Err(err(
                ErrorCode::InvalidArgument,
                "this node has left its cluster",
            ));
        }
        let epoch = slice.epoch;
        let bytes = slice.stage.weight_bytes() as u64;
        let mut slices = lock(&self.slices);
        if slices.contains_key(&epoch) {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("epoch {epoch} already has a slice here"),
            ));
        }
        if !committed {
            if let Some(s) = slices.values().find(|e| e.state == SliceState::Serving) {
                if s.slice.epoch >= epoch {
                    return Err(err(
                        ErrorCode::EpochMismatch,
                        format!(
                            "epoch {epoch} is not newer than the served {}",
                            s.slice.epoch
                        ),
                    ));
                }
            }
            if let Some(limit) = self.cfg.memory_limit {
                let w: u64 = slices
                    .values()
                    .map(|e| e.slice.stage.weight_bytes() as u64)
                    .sum();
                let kv: u64 = lock(&self.sessions).values().map(|s| s.max_kv_bytes).sum();
                if w + kv + bytes > limit {
                    return Err(err(
                        ErrorCode::ResourceExhausted,
                        format!(
                            "the slice of epoch {epoch} needs {bytes} bytes beside the {} held; the limit is {limit}",
                            w + kv
                        ),
                    ));
                }
            }
        }
        slices.insert(
            epoch,
            SliceEntry {
                slice: Arc::new(slice),
                lease,
                state: SliceState::Prepared(Instant::now()),
            },
        );
        drop(slices);
        if committed {
            if let Err(e) = self.commit(epoch) {
                lock(&self.slices).remove(&epoch);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Makes the prepared slice of `epoch` the served one (idempotent). The slice served so far
    /// retires: its sessions finish on it, then it is freed. Prepared slices of older epochs
    /// are dropped.
    pub fn commit(&self, epoch: PlanEpoch) -> Result<(), ShardError> {
        let plan_lease = *lock(&self.plan_lease);
        let mut slices = lock(&self.slices);
        match slices.get(&epoch).map(|e| e.state) {
            None => {
                return Err(err(
                    ErrorCode::NoSlice,
                    format!("no slice is prepared for epoch {epoch}"),
                ))
            }
            Some(SliceState::Serving) => return Ok(()),
            Some(SliceState::Retiring) => {
                return Err(err(
                    ErrorCode::EpochMismatch,
                    format!("epoch {epoch} was replaced by a newer one"),
                ))
            }
            Some(SliceState::Prepared(_)) => {}
        }
        if let Some(s) = slices.values().find(|e| e.state == SliceState::Serving) {
            if s.slice.epoch > epoch {
                return Err(err(
                    ErrorCode::EpochMismatch,
                    format!("epoch {epoch} is behind the served {}", s.slice.epoch),
                ));
            }
        }
        slices.retain(|&e, s| e >= epoch || !matches!(s.state, SliceState::Prepared(_)));
        for (&e, s) in slices.iter_mut() {
            if e == epoch {
                s.state = SliceState::Serving;
                if let Some(p) = plan_lease {
                    s.lease = p;
                }
            } else if s.state == SliceState::Serving {
                s.state = SliceState::Retiring;
            }
        }
        drop(slices);
        self.gc_retiring();
        Ok(())
    }

    /// ABORT: frees the prepared slice of `epoch`; returns its bytes (0 if none: idempotent).
    pub fn abort(&self, epoch: PlanEpoch) -> Result<u64, ShardError> {
        let mut slices = lock(&self.slices);
        match slices.get(&epoch).map(|e| e.state) {
            None => Ok(0),
            Some(SliceState::Prepared(_)) => {
                let bytes = slices
                    .remove(&epoch)
                    .map_or(0, |e| e.slice.stage.weight_bytes() as u64);
                self.freed.store(true, Ordering::Relaxed);
                Ok(bytes)
            }
            Some(_) => Err(err(
                ErrorCode::InvalidArgument,
                format!("epoch {epoch} is committed here; it cannot be aborted"),
            )),
        }
    }

    /// Retires the served slice if it is older than `epoch` (a plan this node is not part
    /// of was committed).
    pub fn retire_before(&self, epoch: PlanEpoch) {
        let mut n = 0;
        for (&e, s) in lock(&self.slices).iter_mut() {
            if e < epoch && s.state == SliceState::Serving {
                s.state = SliceState::Retiring;
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(%epoch, "this node is not in plan {epoch}: its slice retires");
            self.gc_retiring();
        }
    }

    /// Frees retiring slices that no session runs on any more.
    pub fn gc_retiring(&self) {
        let live: HashSet<PlanEpoch> = lock(&self.sessions).values().map(|s| s.epoch).collect();
        let mut freed = Vec::new();
        lock(&self.slices).retain(|&e, s| {
            let keep = s.state != SliceState::Retiring || live.contains(&e);
            if !keep {
                freed.push((e, s.slice.stage.weight_bytes()));
            }
            keep
        });
        for (epoch, bytes) in freed {
            self.freed.store(true, Ordering::Relaxed);
            tracing::info!(%epoch, bytes, "retired slice freed: its last session ended");
        }
    }

    /// Frees every slice and session (the node leaves its cluster); returns the bytes.
    pub fn release_all(&self, why: &str) -> u64 {
        let kv: u64 = lock(&self.sessions)
            .drain()
            .map(|(_, s)| s.kv_bytes.load(Ordering::Relaxed))
            .sum();
        let w: u64 = lock(&self.slices)
            .drain()
            .map(|(_, e)| e.slice.stage.weight_bytes() as u64)
            .sum();
        self.freed.store(true, Ordering::Relaxed);
        tracing::info!(why, kv_bytes = kv, weight_bytes = w, "everything released");
        kv + w
    }

    /// Drops the slice of `epoch` (prepared or committed) and its sessions; returns its bytes.
    pub fn drop_slice(&self, epoch: PlanEpoch) -> Result<u64, ShardError> {
        let e = lock(&self.slices).remove(&epoch).ok_or_else(|| {
            err(
                ErrorCode::EpochMismatch,
                format!("no slice of epoch {epoch}"),
            )
        })?;
        lock(&self.sessions).retain(|_, s| s.epoch != epoch);
        self.freed.store(true, Ordering::Relaxed);
        Ok(e.slice.stage.weight_bytes() as u64)
    }

    /// Bytes held for each lease, by kind (every live lease, even if it holds nothing).
    pub fn held(&self) -> Vec<Held> {
        let mut m: HashMap<LeaseId, Held> = self
            .leases
            .list()
            .into_iter()
            .map(|(id, client, activations)| {
                let h = Held {
                    lease: Some(id),
                    client,
                    activations,
                    ..Default::default()
                };
                (id, h)
            })
            .collect();
        let mut orphan = Held::default();
        for e in lock(&self.slices).values() {
            let h = m.get_mut(&e.lease).unwrap_or(&mut orphan);
            let b = e.slice.stage.weight_bytes() as u64;
            if matches!(e.state, SliceState::Prepared(_)) {
                h.prepared += b;
            } else {
                h.weights += b;
            }
        }
        for s in lock(&self.sessions).values() {
            m.get_mut(&s.lease).unwrap_or(&mut orphan).kv_cache +=
                s.kv_bytes.load(Ordering::Relaxed);
        }
        let mut v: Vec<Held> = m.into_values().collect();
        v.sort_by_key(|h| h.lease);
        if orphan.total() > 0 {
            v.push(orphan);
        }
        v
    }

    /// What the memory limit must leave room for: slices plus every session's most KV bytes.
    fn reserved_bytes(&self) -> u64 {
        let w: u64 = lock(&self.slices)
            .values()
            .map(|e| e.slice.stage.weight_bytes() as u64)
            .sum();
        let kv: u64 = lock(&self.sessions).values().map(|s| s.max_kv_bytes).sum();
        w + kv
    }

    /// Free bytes for the planner: the limit (or the device's total) less what is reserved.
    pub fn free_bytes(&self) -> (u64, u64) {
        let (dev_free, dev_total) =
            common::memory::device_memory(&self.device).unwrap_or((u64::MAX, u64::MAX));
        match self.cfg.memory_limit {
            Some(limit) => (limit.saturating_sub(self.reserved_bytes()), limit),
            None => (dev_free, dev_total),
        }
    }

    /// Bytes of the served and retiring slices (freed once a newer plan commits and their
    /// sessions end).
    pub fn serving_bytes(&self) -> u64 {
        lock(&self.slices)
            .values()
            .filter(|e| !matches!(e.state, SliceState::Prepared(_)))
            .map(|e| e.slice.stage.weight_bytes() as u64)
            .sum()
    }

    /// Adds a session, within the session bound and the memory limit.
    pub fn add_session(&self, id: SessionId, s: SessionEntry) -> Result<(), ShardError> {
        self.leases.check(s.lease)?;
        if let Some(limit) = self.cfg.memory_limit {
            let reserved = self.reserved_bytes();
            if reserved + s.max_kv_bytes > limit {
                return Err(err(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "a session of {} KV bytes does not fit: {reserved} of {limit} bytes are reserved",
                        s.max_kv_bytes
                    ),
                ));
            }
        }
        let mut sessions = lock(&self.sessions);
        if sessions.contains_key(&id) {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("session {id} is already open"),
            ));
        }
        if sessions.len() >= self.cfg.max_sessions {
            return Err(err(
                ErrorCode::ResourceExhausted,
                format!("{} sessions are open, the limit", sessions.len()),
            ));
        }
        sessions.insert(id, Arc::new(s));
        Ok(())
    }

    /// A session by id.
    pub fn session(&self, id: SessionId) -> Result<Arc<SessionEntry>, ShardError> {
        lock(&self.sessions).get(&id).cloned().ok_or_else(|| {
            let why = if self.left.load(Ordering::Relaxed) {
                " (this node has left its cluster; its sessions were ended at the drain deadline)"
            } else {
                ""
            };
            err(
                ErrorCode::UnknownSession,
                format!("session {id} is not open{why}"),
            )
        })
    }

    /// Removes a session owned by `lease`; its cache is freed when the last reference goes.
    pub fn remove_session(&self, id: SessionId, lease: LeaseId) -> Result<u64, ShardError> {
        let mut sessions = lock(&self.sessions);
        let owner = sessions.get(&id).map(|s| s.lease);
        match owner {
            None => Err(err(
                ErrorCode::UnknownSession,
                format!("session {id} is not open"),
            )),
            Some(o) if o != lease => Err(err(
                ErrorCode::UnknownSession,
                format!("session {id} is not open under lease {lease}"),
            )),
            Some(_) => {
                let s = sessions
                    .remove(&id)
                    .map(|s| s.kv_bytes.load(Ordering::Relaxed));
                self.freed.store(true, Ordering::Relaxed);
                drop(sessions);
                self.gc_retiring();
                Ok(s.unwrap_or(0))
            }
        }
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            models_dir: PathBuf::from("models"),
            device: DeviceSpec::Cpu,
            memory_limit: None,
            max_sessions: 64,
            heartbeat_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(5),
            session_idle: Duration::from_secs(300),
            trim: true,
            poll: Duration::ZERO,
        }
    }

    #[test]
    fn validate_refuses_what_would_break_the_node() {
        assert_eq!(config().validate(), Ok(()));
        let poll = |us| NodeConfig {
            poll: Duration::from_micros(us),
            ..config()
        };
        assert_eq!(poll(3000).validate(), Ok(()));
        assert!(poll(2_000_000)
            .validate()
            .is_err_and(|e| e.contains("--poll-us")));
        let sessions = NodeConfig {
            max_sessions: 0,
            ..config()
        };
        assert!(sessions.validate().is_err());
        let ttl = NodeConfig {
            lease_ttl: Duration::from_millis(500),
            ..config()
        };
        assert!(ttl.validate().is_err_and(|e| e.contains("lease TTL")));
    }
}
