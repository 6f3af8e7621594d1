//! Sessions: one request's KV cache on this node, with the slice it runs on and what the
//! memory accounting and the idle reaper read without waiting for a forward pass.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::model::{KvCache, Stage};
use common::sampling::Sampler;
use proto_types::{LeaseId, PlanEpoch};

/// A loaded slice of a model: what a plan epoch has this node run.
#[derive(Debug)]
pub struct Slice {
    /// Its epoch.
    pub epoch: PlanEpoch,
    /// The model file name.
    pub model: String,
    /// The stage.
    pub stage: Stage,
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

impl SessionEntry {
    /// A new session of `lease` on `slice`, with its cache and sampler.
    pub fn new(lease: LeaseId, session: Session) -> Self {
        SessionEntry {
            lease,
            epoch: session.slice.epoch,
            max_kv_bytes: session.cache.max_nbytes() as u64,
            kv_bytes: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(now_ms()),
            state: Mutex::new(session),
        }
    }
}

/// Milliseconds since the first call (the clock of [`SessionEntry::last_used_ms`]).
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
