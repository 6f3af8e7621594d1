//! Sessions: one request's KV cache on this node, with the slice it runs on and what the
//! memory accounting and the idle reaper read without waiting for a forward pass.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::gguf::GgufFile;
use common::grammar::GrammarCompiler;
use common::model::{KvCache, Stage};
use common::sampling::Sampler;
use common::tokenizer::TextTokenizer;
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
    /// The model file, for the tokenizer a grammar needs.
    pub path: std::path::PathBuf,
    /// The grammar compiler of the model's vocabulary, built at the first session that asks
    /// for a grammar (last stage only).
    pub grammar: std::sync::OnceLock<Result<Arc<GrammarCompiler>, String>>,
}

impl Slice {
    /// The grammar compiler, built once (blocking: run it off the async workers).
    pub fn grammar_compiler(&self) -> Result<Arc<GrammarCompiler>, String> {
        self.grammar
            .get_or_init(|| {
                let file = GgufFile::open(&self.path).map_err(|e| e.to_string())?;
                let tok = TextTokenizer::from_gguf(&file).map_err(|e| e.to_string())?;
                let t0 = std::time::Instant::now();
                let c = GrammarCompiler::new(&tok, tok.eos()).map_err(|e| e.to_string())?;
                tracing::info!(model = %self.model, ms = t0.elapsed().as_millis() as u64, "grammar compiler built");
                Ok(Arc::new(c))
            })
            .clone()
    }
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
    /// A prefix-cache entry (see [`proto_types::ForkSession::prefix_cache`]): it runs no
    /// step, the idle reaper leaves it, and it is counted apart from requests' sessions.
    pub prefix_cache: bool,
    /// The state.
    pub state: Mutex<Session>,
    /// On the last stage, the outcome of a step sent with `ReplyRoute::Collect` until it is
    /// collected (its own lock: a pass holds `state`).
    pub outbox: Mutex<super::Outbox>,
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
            prefix_cache: false,
            state: Mutex::new(session),
            outbox: Mutex::default(),
        }
    }
}

/// Milliseconds since the first call (the clock of [`SessionEntry::last_used_ms`]).
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
