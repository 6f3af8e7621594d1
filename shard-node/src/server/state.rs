//! [`Node`]: what a shard node holds (slices, sessions) and who owns each of them (leases).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::device::DeviceSpec;
use common::model::{KvCache, Stage};
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
}

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

/// A slice with its owner.
#[derive(Debug)]
struct SliceEntry {
    slice: Arc<Slice>,
    lease: LeaseId,
    /// Serving (committed), or prepared and waiting for a commit.
    committed: bool,
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
        let node = Node {
            baseline,
            leases: Leases::new(cfg.lease_ttl),
            cfg,
            device,
            compute: Compute::start(tx, metrics.clone())?,
            metrics,
            peers: Arc::new(PeerPool::default()),
            slices: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
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
        lock(&self.slices).retain(|_, e| {
            if e.lease == lease {
                weights += e.slice.stage.weight_bytes() as u64;
                false
            } else {
                true
            }
        });
        self.metrics.leases_released.fetch_add(1, Ordering::Relaxed);
        self.freed.store(true, Ordering::Relaxed);
        tracing::info!(%lease, client, why, sessions = n, kv_bytes = kv, weight_bytes = weights, "lease released");
        kv + weights
    }

    /// Releases leases past their TTL and closes sessions idle too long; trims the heap if
    /// anything was freed since the last call. Run periodically.
    pub fn reap(&self) {
        for lease in self.leases.expired() {
            self.release_lease(lease, "no heartbeat within the TTL");
        }
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
        }
        match *until {
            Some(t) if now <= t => {
                if self.cfg.trim {
                    super::trim::release_free_memory();
                }
            }
            _ => *until = None,
        }
    }

    /// The committed slice, checked against `epoch`.
    pub fn slice_for(&self, epoch: PlanEpoch) -> Result<Arc<Slice>, ShardError> {
        match self.slice() {
            Some(s) if s.epoch == epoch => Ok(s),
            Some(s) => Err(err(
                ErrorCode::EpochMismatch,
                format!("this node serves epoch {}, not {epoch}", s.epoch),
            )),
            None => Err(err(ErrorCode::NoSlice, "no slice is loaded")),
        }
    }

    /// The committed slice (the newest, if more than one), if any.
    pub fn slice(&self) -> Option<Arc<Slice>> {
        lock(&self.slices)
            .values()
            .filter(|e| e.committed)
            .max_by_key(|e| e.slice.epoch)
            .map(|e| e.slice.clone())
    }

    /// Installs a slice owned by `lease`, prepared or committed. A committed slice replaces
    /// every other committed one, and the sessions of older epochs are closed.
    pub fn put_slice(
        &self,
        lease: LeaseId,
        slice: Slice,
        committed: bool,
    ) -> Result<(), ShardError> {
        self.leases.check(lease)?;
        let epoch = slice.epoch;
        let mut slices = lock(&self.slices);
        slices.insert(
            epoch,
            SliceEntry {
                slice: Arc::new(slice),
                lease,
                committed: false,
            },
        );
        drop(slices);
        if committed {
            self.commit(epoch)?;
        }
        Ok(())
    }

    /// Makes the prepared slice of `epoch` the served one; frees older slices and the sessions
    /// that ran on them.
    pub fn commit(&self, epoch: PlanEpoch) -> Result<(), ShardError> {
        let mut slices = lock(&self.slices);
        if !slices.contains_key(&epoch) {
            return Err(err(
                ErrorCode::NoSlice,
                format!("no slice is prepared for epoch {epoch}"),
            ));
        }
        slices.retain(|&e, s| e >= epoch || !s.committed);
        if let Some(s) = slices.get_mut(&epoch) {
            s.committed = true;
        }
        drop(slices);
        lock(&self.sessions).retain(|_, s| s.epoch >= epoch);
        self.freed.store(true, Ordering::Relaxed);
        Ok(())
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
            if e.committed {
                h.weights += b;
            } else {
                h.prepared += b;
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
            err(
                ErrorCode::UnknownSession,
                format!("session {id} is not open"),
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
                Ok(s.unwrap_or(0))
            }
        }
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }
}
