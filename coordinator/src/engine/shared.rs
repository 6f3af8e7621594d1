//! Several choices of one prompt from one prefill: the prompt runs once, in the first
//! choice's session; every other choice's session is a fork of it on every stage (a copy of
//! its KV cache, a sampler of its own); then each choice decodes on its own session, their
//! steps batched together by the nodes.
//!
//! The fork is taken before the prompt's last token: that token runs in each session, so
//! that each choice's first token is picked by its own sampler from the same logits.

use std::sync::Arc;

use common::generate::StageChain;
use common::tokenizer::TextTokenizer;
use proto_types::{ForkSession, SessionId};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::{
    decode, next_session, open, spawn_job, wire_sampling, GenEvent, GenRequest, Job, RemoteChain,
    SessionGuard,
};
use crate::cluster::{ctx, rpc, Cluster};
use crate::error::{CoordError, Result};
use crate::serving::Serving;
use crate::timeouts::TIMEOUTS;

/// Starts the choices `reqs` (one prompt, any sampling each) on one prefill; events of
/// choice `i` arrive on the `i`th receiver. Dropping a receiver stops that choice and frees
/// its session; `admitted` is called once every choice's session is open.
pub fn start_shared(
    serving: Arc<Serving>,
    cluster: Arc<Cluster>,
    tok: Arc<TextTokenizer>,
    reqs: Vec<GenRequest>,
    span: tracing::Span,
    admitted: impl FnOnce() + Send + 'static,
) -> Vec<mpsc::Receiver<GenEvent>> {
    let (txs, rxs): (Vec<_>, Vec<_>) = reqs.iter().map(|_| mpsc::channel(64)).unzip();
    spawn_job(
        serving,
        cluster,
        tok,
        Job::Shared(reqs, txs),
        span,
        admitted,
    );
    rxs
}

/// Opens `to` on every stage as a fork of `from`.
async fn fork_everywhere(
    cluster: &Cluster,
    from: SessionId,
    to: SessionId,
    req: &GenRequest,
) -> Result<()> {
    let fork = ForkSession {
        from,
        to,
        sampling: wire_sampling(req),
        keep: None,
        max_ctx: None,
        prefix_cache: false,
    };
    for node in &cluster.nodes {
        rpc(
            &node.addr,
            node.client()?
                .fork_session(ctx(TIMEOUTS.open_session), fork.clone())
                .await,
        )?;
    }
    Ok(())
}

/// The shared prefill, the forks, then every choice's decode, concurrently.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    tok: &TextTokenizer,
    reqs: &[GenRequest],
    txs: &[mpsc::Sender<GenEvent>],
    admitted: impl FnOnce(),
) -> Result<()> {
    // (the caller groups choices of one prompt and one `max_tokens`: the forks copy the
    // first one's context bound)
    let first = &reqs[0];
    let shared = first.prompt.len().saturating_sub(1);
    let leader = open(&cluster, next_session(), first).await?;
    let span = tracing::info_span!("shared prefill", tokens = shared, choices = reqs.len());
    async {
        let mut chain = RemoteChain::new(&cluster, leader.session)?;
        let mut pos = 0;
        for chunk in first.prompt[..shared].chunks(cluster.prefill_chunk()) {
            chain.step(pos, chunk, false).await?;
            pos += chunk.len();
        }
        Ok::<_, CoordError>(())
    }
    .instrument(span.clone())
    .await?;
    let mut guards: Vec<SessionGuard> = Vec::with_capacity(reqs.len());
    for r in &reqs[1..] {
        let guard = SessionGuard {
            cluster: cluster.clone(),
            session: next_session(),
            open: true,
        };
        fork_everywhere(&cluster, leader.session, guard.session, r)
            .instrument(span.clone())
            .await?;
        guards.push(guard);
    }
    guards.insert(0, leader);
    drop(span);
    admitted();
    let runs = guards
        .into_iter()
        .zip(reqs)
        .zip(txs)
        .map(|((guard, req), tx)| {
            let cluster = &cluster;
            async move {
                if let Err(e) = decode(cluster, tok, guard, req.clone(), shared, None, tx).await {
                    let _ = tx.send(GenEvent::Error(e)).await;
                }
            }
        });
    futures::future::join_all(runs).await;
    Ok(())
}
