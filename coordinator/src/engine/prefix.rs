//! The prefix cache: prompts' KV caches kept on every stage, so that a request whose prompt
//! begins like an earlier one (a system prompt, a chat history) copies that prefix's keys
//! and values instead of computing them again.
//!
//! An entry is a session of its own on every stage, opened as a compact copy of a finished
//! request's cache cut to its prompt (`fork_session` with `keep` and `prefix_cache`). It is
//! held by this coordinator's connection lease, so it goes with everything else when the
//! lease ends (the coordinator exits or dies, the plan is replaced), and each node reports it
//! apart, as `prefix_cache` bytes. Entries are evicted least recently used once any stage
//! holds more than the budget (`--prefix-cache-bytes`; 0: no cache). A hit is a fork of the
//! entry into the request's session, cut to the shared prefix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proto_types::*;

use super::{close_everywhere, next_session, wire_sampling, GenRequest};
use crate::cluster::{ctx, rpc, Cluster};
use crate::error::{CoordError, Result};
use crate::timeouts::TIMEOUTS;

/// Prompts shorter than this are neither cached nor looked up: copying would save little.
pub const MIN_TOKENS: usize = 32;

/// The budget for each stage's entries, in bytes (`--prefix-cache-bytes`).
static BUDGET: AtomicU64 = AtomicU64::new(DEFAULT_BUDGET);

/// The default budget: 512 MiB on each stage.
pub const DEFAULT_BUDGET: u64 = 512 << 20;

/// Sets the budget of the caches made from now on (0 turns the cache off).
pub fn set_budget(bytes: u64) {
    BUDGET.store(bytes, Ordering::Relaxed);
}

/// One cached prompt.
#[derive(Debug)]
pub struct Entry {
    /// Its tokens.
    tokens: Vec<u32>,
    /// Its session on every stage.
    session: SessionId,
    /// Its bytes on each stage.
    bytes: Vec<u64>,
    /// When it was last used ([`PrefixCache`]'s clock).
    used: AtomicU64,
}

/// A hit: the entry and how many of the prompt's tokens it holds.
#[derive(Debug, Clone)]
pub struct Hit {
    entry: Arc<Entry>,
    /// Prompt tokens it covers (at least one is left to compute).
    pub tokens: usize,
}

/// One plan's cache (its entries are sessions of that plan's connections).
#[derive(Debug)]
pub struct PrefixCache {
    budget: u64,
    clock: AtomicU64,
    entries: Mutex<Vec<Arc<Entry>>>,
    /// Stores run one at a time: each makes room before it copies, so that no stage ever
    /// holds more than the budget.
    storing: tokio::sync::Mutex<()>,
    /// Bytes an entry takes per token on each stage, learned from the first one stored (a
    /// ring of a windowed layer makes it an upper bound).
    per_token: Mutex<Option<Vec<u64>>>,
}

impl Default for PrefixCache {
    fn default() -> Self {
        PrefixCache {
            budget: BUDGET.load(Ordering::Relaxed),
            clock: AtomicU64::new(0),
            entries: Mutex::new(Vec::new()),
            storing: Default::default(),
            per_token: Mutex::new(None),
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry sharing the longest prefix with `prompt`, if it shares at least
    /// [`MIN_TOKENS`]; the hit leaves the prompt's last token to compute.
    pub fn lookup(&self, prompt: &[u32]) -> Option<Hit> {
        if self.budget == 0 || prompt.len() <= MIN_TOKENS {
            return None;
        }
        let entries = self.lock();
        let (entry, n) = entries
            .iter()
            .map(|e| (e, common_prefix(&e.tokens, prompt)))
            .max_by_key(|(_, n)| *n)?;
        let tokens = n.min(prompt.len() - 1);
        if tokens < MIN_TOKENS {
            return None;
        }
        entry.used.store(self.tick(), Ordering::Relaxed);
        Some(Hit {
            entry: entry.clone(),
            tokens,
        })
    }

    /// Drops the hit's entry (a stage no longer has it: the node restarted, say), closing it
    /// on every stage.
    pub fn forget(&self, cluster: &Arc<Cluster>, hit: &Hit) {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|e| !Arc::ptr_eq(e, &hit.entry));
        if entries.len() < before {
            tokio::spawn(close_everywhere(cluster.clone(), hit.entry.session));
        }
    }

    /// Opens `session` on every stage as a copy of the hit's entry cut to its shared prefix,
    /// for `req` (the copies reserve the request's whole context, as `open_session` does).
    pub async fn open_from(
        &self,
        cluster: &Cluster,
        session: SessionId,
        req: &GenRequest,
        hit: &Hit,
    ) -> Result<()> {
        let max_ctx = (req.prompt.len() + req.max_tokens).min(cluster.max_ctx) as u32;
        let sampling = wire_sampling(req);
        for node in &cluster.nodes {
            let fork = ForkSession {
                from: hit.entry.session,
                to: session,
                sampling: sampling.clone(),
                keep: Some(hit.tokens as u32),
                max_ctx: Some(max_ctx),
                prefix_cache: false,
            };
            rpc(
                &node.addr,
                node.client()?
                    .fork_session(ctx(TIMEOUTS.open_session), fork)
                    .await,
            )?;
        }
        Ok(())
    }

    /// Keeps `prompt`'s keys and values from `from` (a finished request's session, which
    /// holds the prompt and what it generated) as a new entry, unless an entry holds the
    /// whole prompt already. Entries it extends go, and the least recently used ones until the
    /// new one fits the budget on every stage, before it is copied. A copy a node refuses (its
    /// memory limit) is given up.
    pub async fn store(&self, cluster: &Arc<Cluster>, from: SessionId, prompt: &[u32]) {
        if self.budget == 0 || prompt.len() <= MIN_TOKENS {
            return;
        }
        let _one = self.storing.lock().await;
        let covered = |entries: &[Arc<Entry>]| {
            entries
                .iter()
                .any(|e| common_prefix(&e.tokens, prompt) == prompt.len())
        };
        if covered(&self.lock()) {
            return;
        }
        let stages = cluster.nodes.len();
        let need: Option<Vec<u64>> = self
            .per_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|p| p.iter().map(|b| b * prompt.len() as u64).collect());
        if let Some(big) = need
            .as_ref()
            .and_then(|n| n.iter().copied().max())
            .filter(|&b| b > self.budget)
        {
            // Said once: an operator who sees no hits for long prompts learns why.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    tokens = prompt.len(),
                    bytes = big,
                    budget = self.budget,
                    "a prompt's prefix is larger than the prefix cache of a stage and is not \
                     kept; raise --prefix-cache-bytes to cache prompts this long"
                );
            }
            return;
        }
        // room first: what this one extends, then the least recently used
        let gone = {
            let mut entries = self.lock();
            let (keep, mut gone): (Vec<_>, Vec<_>) = std::mem::take(&mut *entries)
                .into_iter()
                .partition(|e| common_prefix(&e.tokens, prompt) < e.tokens.len());
            *entries = keep;
            let need = need.clone().unwrap_or_else(|| vec![0; stages]);
            while !fits(&entries, &need, self.budget) {
                let Some(oldest) = entries
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.used.load(Ordering::Relaxed))
                    .map(|(i, _)| i)
                else {
                    break;
                };
                gone.push(entries.remove(oldest));
            }
            gone
        };
        for e in gone {
            close_everywhere(cluster.clone(), e.session).await;
        }
        let session = next_session();
        let copied = async {
            let mut bytes = Vec::with_capacity(stages);
            for node in &cluster.nodes {
                let fork = ForkSession {
                    from,
                    to: session,
                    sampling: WireSampling::default(),
                    keep: Some(prompt.len() as u32),
                    max_ctx: Some(prompt.len() as u32),
                    prefix_cache: true,
                };
                bytes.push(rpc(
                    &node.addr,
                    node.client()?
                        .fork_session(ctx(TIMEOUTS.open_session), fork)
                        .await,
                )?);
            }
            Ok::<_, CoordError>(bytes)
        };
        let bytes = match copied.await {
            Ok(b) if fits(&self.lock(), &b, self.budget) => b,
            Ok(_) => {
                close_everywhere(cluster.clone(), session).await;
                return;
            }
            Err(e) => {
                tracing::debug!("not caching a prompt of {} tokens: {e}", prompt.len());
                close_everywhere(cluster.clone(), session).await;
                return;
            }
        };
        self.per_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| {
                bytes
                    .iter()
                    .map(|b| b.div_ceil(prompt.len() as u64))
                    .collect()
            });
        self.lock().push(Arc::new(Entry {
            tokens: prompt.to_vec(),
            session,
            bytes,
            used: AtomicU64::new(self.tick()),
        }));
    }
}

/// Whether entries and `more` bytes on each stage fit `budget` on every stage.
fn fits(entries: &[Arc<Entry>], more: &[u64], budget: u64) -> bool {
    let mut total = more.to_vec();
    for e in entries {
        for (t, b) in total.iter_mut().zip(&e.bytes) {
            *t += b;
        }
    }
    total.iter().all(|&t| t <= budget)
}
