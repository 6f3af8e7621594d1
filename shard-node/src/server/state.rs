//! [`Node`]: what a shard node holds: its slice, its sessions and its leases.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// One session's state on this node.
#[derive(Debug)]
pub struct Session {
    /// Owner.
    pub lease: LeaseId,
    /// The slice's epoch it runs on.
    pub epoch: PlanEpoch,
    /// The slice it runs on.
    pub slice: Arc<Slice>,
    /// Its keys and values.
    pub cache: KvCache,
    /// The next stage's address, if any.
    pub next: Option<String>,
    /// The last stage's sampler.
    pub sampler: Sampler,
}

#[derive(Debug)]
struct Lease {
    client: String,
    renewed: Instant,
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
    slice: Mutex<Option<Arc<Slice>>>,
    sessions: Mutex<HashMap<SessionId, Arc<Mutex<Session>>>>,
    leases: Mutex<HashMap<LeaseId, Lease>>,
    next_lease: AtomicU64,
}

/// Locks a mutex, recovering from poisoning (a panic elsewhere must not wedge the node).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        let node = Node {
            cfg,
            device,
            compute: Compute::start(tx, metrics.clone())?,
            metrics,
            peers: Arc::new(PeerPool::default()),
            slice: Mutex::new(None),
            sessions: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            next_lease: AtomicU64::new(1),
        };
        Ok((node, rx))
    }

    /// Live leases.
    pub fn lease_count(&self) -> usize {
        lock(&self.leases).len()
    }

    /// A new lease for a client.
    pub fn grant_lease(&self, client: String) -> LeaseId {
        let id = LeaseId(self.next_lease.fetch_add(1, Ordering::Relaxed));
        lock(&self.leases).insert(
            id,
            Lease {
                client,
                renewed: Instant::now(),
            },
        );
        id
    }

    /// Renews a lease; unknown leases are an error.
    pub fn renew(&self, lease: LeaseId) -> Result<Duration, ShardError> {
        match lock(&self.leases).get_mut(&lease) {
            Some(l) => {
                l.renewed = Instant::now();
                Ok(self.cfg.lease_ttl)
            }
            None => Err(ShardError::new(
                ErrorCode::UnknownLease,
                format!("lease {lease} is unknown or expired"),
            )),
        }
    }

    /// Ends a lease and frees every session it owns; returns the bytes freed.
    pub fn release_lease(&self, lease: LeaseId, why: &str) -> u64 {
        let client = lock(&self.leases)
            .remove(&lease)
            .map(|l| l.client)
            .unwrap_or_default();
        let mut freed = 0u64;
        let mut n = 0;
        lock(&self.sessions).retain(|_, s| {
            let s = lock(s);
            if s.lease == lease {
                freed += s.cache.nbytes() as u64;
                n += 1;
                false
            } else {
                true
            }
        });
        self.metrics
            .leases_released
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(%lease, client, why, sessions = n, bytes = freed, "lease released");
        freed
    }

    /// The current slice, checked against `epoch`.
    pub fn slice_for(&self, epoch: PlanEpoch) -> Result<Arc<Slice>, ShardError> {
        match lock(&self.slice).as_ref() {
            Some(s) if s.epoch == epoch => Ok(s.clone()),
            Some(s) => Err(ShardError::new(
                ErrorCode::EpochMismatch,
                format!("this node serves epoch {}, not {epoch}", s.epoch),
            )),
            None => Err(ShardError::new(ErrorCode::NoSlice, "no slice is loaded")),
        }
    }

    /// The current slice, if any.
    pub fn slice(&self) -> Option<Arc<Slice>> {
        lock(&self.slice).clone()
    }

    /// Installs a slice (the old one is freed once its sessions are gone).
    pub fn set_slice(&self, slice: Option<Arc<Slice>>) {
        *lock(&self.slice) = slice;
    }

    /// Bytes held by weights and caches.
    pub fn used_bytes(&self) -> u64 {
        let w = self.slice().map_or(0, |s| s.stage.weight_bytes() as u64);
        w + self.kv_bytes()
    }

    /// Bytes held by KV caches.
    pub fn kv_bytes(&self) -> u64 {
        lock(&self.sessions)
            .values()
            .map(|s| lock(s).cache.nbytes() as u64)
            .sum()
    }

    /// Adds a session, within the session bound.
    pub fn add_session(&self, id: SessionId, s: Session) -> Result<(), ShardError> {
        let mut sessions = lock(&self.sessions);
        if sessions.contains_key(&id) {
            return Err(ShardError::new(
                ErrorCode::InvalidArgument,
                format!("session {id} is already open"),
            ));
        }
        if sessions.len() >= self.cfg.max_sessions {
            return Err(ShardError::new(
                ErrorCode::ResourceExhausted,
                format!("{} sessions are open, the limit", sessions.len()),
            ));
        }
        sessions.insert(id, Arc::new(Mutex::new(s)));
        Ok(())
    }

    /// A session by id.
    pub fn session(&self, id: SessionId) -> Result<Arc<Mutex<Session>>, ShardError> {
        lock(&self.sessions).get(&id).cloned().ok_or_else(|| {
            ShardError::new(
                ErrorCode::UnknownSession,
                format!("session {id} is not open"),
            )
        })
    }

    /// Removes a session; its cache is freed when the last reference goes.
    pub fn remove_session(&self, id: SessionId) -> Result<u64, ShardError> {
        let s = lock(&self.sessions).remove(&id).ok_or_else(|| {
            ShardError::new(
                ErrorCode::UnknownSession,
                format!("session {id} is not open"),
            )
        })?;
        let bytes = lock(&s).cache.nbytes() as u64;
        Ok(bytes)
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Sessions per lease, with their cache bytes.
    pub fn lease_bytes(&self) -> Vec<(LeaseId, u64)> {
        let mut m: HashMap<LeaseId, u64> = lock(&self.leases).keys().map(|&l| (l, 0)).collect();
        for s in lock(&self.sessions).values() {
            let s = lock(s);
            *m.entry(s.lease).or_default() += s.cache.nbytes() as u64;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort();
        v
    }
}
