//! The generation task: one per request, it opens a session on every stage, prefills in
//! chunks, decodes token by token, streams text out, and closes the session on every stage
//! when it ends for any reason, the client going away included.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::generate::{generate, FinishReason, GenerateParams, Piece, StageChain};
use common::sampling::{Pick, SamplingParams, TokenLogprobs};
use common::tokenizer::TextTokenizer;
use proto_types::*;
use tokio::sync::mpsc;
use tracing::Instrument;

pub use prefix::PrefixCache;
pub use shared::start_shared;

use crate::cluster::{ctx, rpc, untraced_ctx, Cluster};
use crate::error::{CoordError, Result};
use crate::serving::Serving;
use crate::timeouts::TIMEOUTS;

pub mod prefix;
mod shared;

/// What a request asks for, already tokenized.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Go on past end-of-generation tokens.
    pub ignore_eos: bool,
    /// What the output must match (checked to compile).
    pub grammar: Option<common::grammar::Grammar>,
}

/// What the generation task streams back.
#[derive(Debug)]
pub enum GenEvent {
    /// A piece of text, with its tokens' log-probabilities when they were asked for.
    Piece(Piece),
    /// The end.
    Done {
        /// Why.
        finish: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
    },
    /// A failure; nothing follows.
    Error(CoordError),
}

/// A grammar to the wire.
fn wire_grammar(g: &common::grammar::Grammar) -> WireGrammar {
    use common::grammar::Grammar;
    match g {
        Grammar::JsonObject => WireGrammar::JsonObject,
        Grammar::JsonSchema(s) => WireGrammar::JsonSchema(s.clone()),
        Grammar::Regex(s) => WireGrammar::Regex(s.clone()),
        Grammar::Lark(s) => WireGrammar::Lark(s.clone()),
    }
}

/// The next session id, from a random start: a node's sessions are keyed by id alone (the
/// next stage hears of them over another connection), and several coordinators share the
/// nodes, each with its prefix-cache entries open for as long as they last.
static NEXT_SESSION: std::sync::LazyLock<AtomicU64> = std::sync::LazyLock::new(|| {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    // a quarter of the range left above the start, so that it never wraps to 0
    AtomicU64::new((h.finish() >> 2).max(1))
});

/// Closes the session on every stage: awaited by [`SessionGuard::close`] when a request ends,
/// spawned from `Drop` when it is cut short (an error, or the client going away).
pub(crate) struct SessionGuard {
    cluster: Arc<Cluster>,
    session: SessionId,
    open: bool,
}

pub(crate) async fn close_everywhere(c: Arc<Cluster>, s: SessionId) {
    for n in &c.nodes {
        // An unknown session is fine: it may never have been opened there. A node that is
        // down has lost the session already.
        if let Ok(client) = n.client() {
            let _ = client.close_session(ctx(TIMEOUTS.close_session), s).await;
        }
    }
}

impl SessionGuard {
    /// Closes the session now, so that it is gone before the caller answers.
    async fn close(mut self) {
        self.open = false;
        close_everywhere(self.cluster.clone(), self.session).await;
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.open {
            tokio::spawn(close_everywhere(self.cluster.clone(), self.session));
        }
    }
}

/// How long a request refused for an old epoch waits for this coordinator to learn of the
/// newer plan (it follows etcd; the nodes hear of a commit first).
const EPOCH_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a request refused by a node that holds no slice for its plan (restarted, or gone
/// from the plan) waits for a newer plan: the driver has to notice and commit one first.
const REPLAN_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts generating; events arrive on the returned channel. Dropping the receiver stops the
/// generation and frees the session on every stage. `admitted` is called once the session is
/// open on every stage.
///
/// A request whose admission fails on `cluster` while `serving` has moved, or is about to
/// move, to a newer plan is admitted again on that plan, once: a node that has committed a
/// newer plan refuses new sessions on the old one, and a coordinator that follows the plans
/// learns of the commit a moment after the nodes. Nothing has been streamed then, so the
/// client sees no failure.
pub fn start(
    serving: Arc<Serving>,
    cluster: Arc<Cluster>,
    tok: Arc<TextTokenizer>,
    req: GenRequest,
    span: tracing::Span,
    admitted: impl FnOnce() + Send + 'static,
) -> mpsc::Receiver<GenEvent> {
    let (tx, rx) = mpsc::channel(64);
    spawn_job(serving, cluster, tok, Job::One(req, tx), span, admitted);
    rx
}

/// What one generation task does.
enum Job {
    /// One choice.
    One(GenRequest, mpsc::Sender<GenEvent>),
    /// Several choices of one prompt, its prefill shared ([`start_shared`]).
    Shared(Vec<GenRequest>, Vec<mpsc::Sender<GenEvent>>),
}

impl Job {
    async fn run(
        &self,
        cluster: Arc<Cluster>,
        tok: &TextTokenizer,
        admitted: impl FnOnce(),
    ) -> Result<()> {
        match self {
            Job::One(req, tx) => run(cluster, tok, req.clone(), tx, admitted).await,
            Job::Shared(reqs, txs) => shared::run(cluster, tok, reqs, txs, admitted).await,
        }
    }

    /// Where a failure of the job as a whole is reported.
    fn first(&self) -> &mpsc::Sender<GenEvent> {
        match self {
            Job::One(_, tx) => tx,
            Job::Shared(_, txs) => &txs[0],
        }
    }
}

/// Runs `job` in a task of its own, in the request's span (the RPCs to the nodes carry its
/// trace), admitting it again on a newer plan when it was refused on an old one.
fn spawn_job(
    serving: Arc<Serving>,
    cluster: Arc<Cluster>,
    tok: Arc<TextTokenizer>,
    job: Job,
    span: tracing::Span,
    admitted: impl FnOnce() + Send + 'static,
) {
    tokio::spawn(
        async move {
            let mut admitted = Some(admitted);
            let epoch = cluster.epoch;
            let mut r = job
                .run(cluster, &tok, || {
                    if let Some(a) = admitted.take() {
                        a();
                    }
                })
                .await;
            if let (Err(e), Some(a)) = (&r, admitted.take()) {
                // A node that has committed a newer plan refuses sessions on this one: this
                // coordinator hears of the commit a moment later, so it waits for it then. A
                // node with no slice at all (it restarted, or left) waits for the re-plan.
                let wait = match e {
                    CoordError::Shard { err, .. } if err.code == ErrorCode::EpochMismatch => {
                        EPOCH_CATCH_UP
                    }
                    CoordError::Shard { err, .. } if err.code == ErrorCode::NoSlice => {
                        REPLAN_CATCH_UP
                    }
                    _ => std::time::Duration::ZERO,
                };
                if let Some(newer) = serving.newer_than(epoch, wait).await {
                    tracing::info!(%epoch, newer = %newer.epoch, "admission failed on an old plan ({e}); admitting on the new one");
                    r = job.run(newer, &tok, a).await;
                }
            }
            if let Err(e) = r {
                let _ = job.first().send(GenEvent::Error(e)).await;
            }
        }
        .instrument(span),
    );
}

async fn run(
    cluster: Arc<Cluster>,
    tok: &TextTokenizer,
    req: GenRequest,
    tx: &mpsc::Sender<GenEvent>,
    admitted: impl FnOnce(),
) -> Result<()> {
    let session = next_session();
    // A prompt that begins like a cached one copies that prefix on every stage.
    let mut cached = 0;
    let mut guard = None;
    if let Some(hit) = cluster.prefix.lookup(&req.prompt) {
        let g = SessionGuard {
            cluster: cluster.clone(),
            session,
            open: true,
        };
        match cluster
            .prefix
            .open_from(&cluster, session, &req, &hit)
            .await
        {
            Ok(()) => {
                cached = hit.tokens;
                guard = Some(g);
            }
            Err(e) => {
                // An entry evicted meanwhile, or lost with a node that restarted: computed in
                // full instead, and an entry a stage no longer has is dropped.
                tracing::debug!("prefix cache hit not used: {e}");
                if matches!(&e, CoordError::Shard { err, .. } if err.code == ErrorCode::UnknownSession)
                {
                    cluster.prefix.forget(&cluster, &hit);
                }
                g.close().await;
            }
        }
    }
    let guard = match guard {
        Some(g) => g,
        None => open(&cluster, session, &req).await?,
    };
    admitted();
    decode(&cluster, tok, guard, req, cached, Some(cached), tx).await
}

pub(crate) fn next_session() -> SessionId {
    SessionId(NEXT_SESSION.fetch_add(1, Ordering::Relaxed))
}

/// How the last stage picks `req`'s tokens, for the wire.
pub(crate) fn wire_sampling(req: &GenRequest) -> WireSampling {
    let s = &req.sampling;
    WireSampling {
        temperature: s.temperature,
        top_k: s.top_k as u32,
        top_p: s.top_p,
        seed: s.seed,
        min_p: s.min_p,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty,
        logit_bias: s.logit_bias.clone(),
        logprobs: s.logprobs,
        // The repetition penalty counts the prompt's tokens too: only then are they sent.
        prompt: if s.repetition_penalty != 1.0 {
            req.prompt.clone()
        } else {
            Vec::new()
        },
        grammar: req.grammar.as_ref().map(wire_grammar),
    }
}

/// Admission: `session` opened on every stage, last stage first (each needs the next
/// one's), each reserving its KV cache within the node's memory limit.
async fn open(
    cluster: &Arc<Cluster>,
    session: SessionId,
    req: &GenRequest,
) -> Result<SessionGuard> {
    let guard = SessionGuard {
        cluster: cluster.clone(),
        session,
        open: true,
    };
    let sampling = wire_sampling(req);
    let max_ctx = (req.prompt.len() + req.max_tokens).min(cluster.max_ctx) as u32;
    let open_all = async {
        let n = cluster.nodes.len();
        for i in (0..n).rev() {
            let node = &cluster.nodes[i];
            let next = (i + 1 < n).then(|| cluster.nodes[i + 1].addr.clone());
            let open = OpenSession {
                session,
                epoch: cluster.epoch,
                max_ctx,
                next,
                sampling: sampling.clone(),
            };
            rpc(
                &node.addr,
                node.client()?
                    .open_session(ctx(TIMEOUTS.open_session), open)
                    .await,
            )?;
        }
        Ok::<_, CoordError>(())
    };
    open_all
        .instrument(tracing::info_span!("admission", %session, stages = cluster.nodes.len()))
        .await?;
    Ok(guard)
}

/// Generates `req` on the open session of `guard`, whose KV cache holds the prompt's first
/// `cached` tokens already, streaming to `tx`; closes the session at the end. `from_cache`:
/// how many came from the prefix cache, for a request of its own (whose prompt is then
/// offered to the cache); `None` for a choice of several that share a prefill.
async fn decode(
    cluster: &Arc<Cluster>,
    tok: &TextTokenizer,
    guard: SessionGuard,
    req: GenRequest,
    cached: usize,
    from_cache: Option<usize>,
    tx: &mpsc::Sender<GenEvent>,
) -> Result<()> {
    let mut chain = RemoteChain::new(cluster, guard.session)?;
    let params = GenerateParams {
        max_tokens: req.max_tokens,
        sampling: req.sampling,
        stop: req.stop,
        ignore_eos: req.ignore_eos,
        cached,
    };
    let g = generate(&mut chain, tok, &req.prompt, &params, |piece| async move {
        tx.send(GenEvent::Piece(piece)).await.is_ok()
    })
    .await?;
    // The client went away: the guard frees the session.
    let Some(finish) = g.finish else {
        return Ok(());
    };
    let _ = tx
        .send(GenEvent::Done {
            finish,
            prompt_tokens: g.prompt_tokens,
            completion_tokens: g.tokens.len(),
            cached_tokens: from_cache.unwrap_or(0),
        })
        .await;
    // The prompt's keys and values, for requests to come (after the answer: it costs this
    // request nothing).
    if from_cache.is_some_and(|n| n < req.prompt.len()) {
        cluster
            .prefix
            .store(cluster, guard.session, &req.prompt)
            .await;
    }
    guard.close().await;
    Ok(())
}

/// Whether steps' tokens come straight from the last stage (see [`set_replies`]).
static DIRECT_REPLIES: AtomicBool = AtomicBool::new(false);

/// How the chains made from now on have their tokens come back (`serve --replies`).
pub fn set_replies(r: crate::config::Replies) {
    DIRECT_REPLIES.store(r == crate::config::Replies::Direct, Ordering::Relaxed);
}

/// The stages of the served plan, reached through the first: one session on each.
struct RemoteChain<'c> {
    cluster: &'c Cluster,
    client: ShardNodeClient,
    /// The last stage, where each step's token is collected, when it answers directly
    /// (several stages and `--replies direct`).
    last: Option<Direct<'c>>,
    session: SessionId,
    /// The one `untraced` span of the request's steps left out of its trace (made once: a
    /// span per step cost the exporter's layer a span to build and drop every token).
    quiet: tracing::Span,
}

/// What the first stage answers a step.
type ChainReply =
    std::result::Result<std::result::Result<ForwardReply, ShardError>, tarpc::client::RpcError>;

/// The last stage of a chain whose tokens are collected there.
struct Direct<'c> {
    addr: &'c str,
    client: ShardNodeClient,
    /// The session's key: only a step sent with it answers `collect`.
    key: ReplyKey,
    /// The chain's answer to the last step, still on its way back when its token came.
    ack: Option<tokio::task::JoinHandle<ChainReply>>,
}

impl<'c> RemoteChain<'c> {
    /// The chain of `session` on `cluster`'s stages.
    fn new(cluster: &'c Cluster, session: SessionId) -> Result<Self> {
        let last = match &cluster.nodes[..] {
            [_, .., last] if DIRECT_REPLIES.load(Ordering::Relaxed) => Some(Direct {
                addr: last.addr.as_str(),
                client: last.client()?,
                key: ReplyKey(rand::random()),
                ack: None,
            }),
            _ => None,
        };
        Ok(RemoteChain {
            client: cluster.nodes[0].client()?,
            last,
            cluster,
            session,
            quiet: common::telemetry::untraced_span(),
        })
    }
}

impl Drop for RemoteChain<'_> {
    fn drop(&mut self) {
        // The request is over: the last acknowledgement is not waited for.
        if let Some(ack) = self.last.as_mut().and_then(|d| d.ack.take()) {
            ack.abort();
        }
    }
}

/// The outcome of the one item the first stage (at `addr`) answered for.
fn only(addr: &str, reply: ForwardReply) -> Result<ForwardOutput> {
    match reply.outputs.into_iter().next() {
        Some(Ok(o)) => Ok(o),
        Some(Err(err)) => Err(CoordError::Shard {
            addr: addr.to_string(),
            err,
        }),
        None => Err(CoordError::NodeDown {
            addr: addr.to_string(),
            detail: "empty reply".into(),
        }),
    }
}

/// What the first stage's answer says of a step: nothing if it ran everywhere.
fn chain_outcome(
    addr: &str,
    joined: std::result::Result<ChainReply, tokio::task::JoinError>,
) -> Result<()> {
    let reply = joined.map_err(|e| CoordError::NodeDown {
        addr: addr.to_string(),
        detail: format!("the step's call failed: {e}"),
    })?;
    only(addr, rpc(addr, reply)?).map(drop)
}

impl StageChain for RemoteChain<'_> {
    type Error = CoordError;

    /// One step of the session through the whole pipeline: the first stage relays it on, and
    /// the last stage's sampled token comes back (when `pick`): collected from the last
    /// stage while the step goes down the chain, or back along the chain.
    async fn step(&mut self, start: usize, ids: &[u32], pick: bool) -> Result<Option<Pick>> {
        let addr = &self.cluster.nodes[0].addr;
        let item = ForwardItem {
            session: self.session,
            start: start as u32,
            input: StageInput::Tokens(ids.to_vec()),
            pick,
            want_logits: false,
            reply: match &self.last {
                Some(d) => ReplyRoute::Collect(d.key),
                None => ReplyRoute::Chain,
            },
        };
        let req = ForwardRequest {
            epoch: self.cluster.epoch,
            items: vec![item],
        };
        // Decode steps are traced one in `DECODE_TRACE_EVERY` (see common::telemetry): the
        // others go out unsampled and unrecorded, so that no stage records them either.
        let sampled = ids.len() > 1 || common::telemetry::traced_step(start);
        let (call, span) = if sampled {
            (ctx(TIMEOUTS.step), tracing::Span::current())
        } else {
            (untraced_ctx(TIMEOUTS.step), self.quiet.clone())
        };
        let out = match &mut self.last {
            None => {
                let reply = self.client.forward(call, req).instrument(span).await;
                only(addr, rpc(addr, reply)?)?
            }
            Some(d) => {
                // The last step's acknowledgement, if it has come back: a stage that failed
                // after the token was collected fails the request here.
                if let Some(ack) = d.ack.take_if(|a| a.is_finished()) {
                    chain_outcome(addr, ack.await)?;
                }
                // The chain's answer only says the step was handed on (or why it failed); it
                // is left to come in the background once the token is here.
                let client = self.client.clone();
                let mut chain = tokio::spawn(
                    async move { client.forward(call, req).await }.instrument(span.clone()),
                );
                let collect = d
                    .client
                    .collect(call, self.session, start as u32, d.key)
                    .instrument(span);
                let mut collect = std::pin::pin!(collect);
                let collected = tokio::select! {
                    c = &mut collect => {
                        d.ack = Some(chain);
                        c
                    }
                    j = &mut chain => {
                        // an error anywhere down the chain, or an ack ahead of the token
                        chain_outcome(addr, j)?;
                        collect.await
                    }
                };
                rpc(d.addr, collected)?
            }
        };
        Ok(out.pick.map(|p| Pick {
            token: p.token,
            logprobs: p
                .logprobs
                .map(|(logprob, top)| TokenLogprobs { logprob, top }),
        }))
    }

    fn prefill_chunk(&self) -> usize {
        self.cluster.prefill_chunk()
    }
}
