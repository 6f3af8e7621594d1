//! Continuous batching: the session steps queued while the compute thread was busy run as one
//! forward pass, so the weights are read once for all of them.
//!
//! Every step is checked on its own first (session epoch, position, context bound, input), and
//! one that fails is answered alone. The rest run through [`Stage::forward_batch`]. On the last
//! stage each step's token is sampled with its session's sampler; on other stages the
//! activations go on to the next stage as one [`Onward`] request per address. A last stage's
//! outcome routed to `collect` waits in its session's [`crate::node::Outbox`]; errors always
//! go back along the chain.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use candle_core::Tensor;
use common::model::Segment;
use common::sampling::Pick;
use proto_types::*;
use tarpc::context::Context;
use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use super::wire::{candle_err, shard_err, to_tensor, to_wire, wire_pick};
use crate::node::outbox::Ticket;
use crate::node::{lock, now_ms, Charge, SessionEntry, Slice};

/// Where an item's outcome goes.
pub type Reply = oneshot::Sender<Result<ForwardOutput, ShardError>>;

/// One session step waiting for the compute thread.
#[derive(Debug)]
pub struct Pending {
    /// The step.
    pub item: ForwardItem,
    /// Its session.
    pub session: Arc<SessionEntry>,
    /// The slice the request named.
    pub slice: Arc<Slice>,
    /// The caller's context (deadline, trace).
    pub ctx: Context,
    /// Where the outcome goes.
    pub reply: Reply,
    /// The input's bytes, charged to the sender's lease until the step has run.
    pub charge: Charge,
}

impl Pending {
    /// Token rows of the step.
    pub fn rows(&self) -> usize {
        match &self.item.input {
            StageInput::Tokens(t) => t.len(),
            StageInput::Hidden(w) => w.shape.first().map_or(0, |&d| d as usize),
        }
    }

    /// Answers the step: its charge is given back first, so that whoever reads the reply
    /// finds the bytes already returned.
    pub fn finish(self, r: Result<ForwardOutput, ShardError>) {
        let Pending { reply, charge, .. } = self;
        drop(charge);
        let _ = reply.send(r);
    }

    /// Leaves the outcome `o` in the session's outbox for the `collect` with `key`, and
    /// answers the chain with an empty output (the step ran). The charge goes first, as in
    /// [`Pending::finish`]: whoever has the token finds the bytes returned.
    pub fn finish_collected(self, key: ReplyKey, o: ForwardOutput) {
        let Pending {
            item,
            session,
            reply,
            charge,
            ..
        } = self;
        drop(charge);
        let ack = ForwardOutput {
            session: o.session,
            pick: None,
            logits: None,
        };
        let ticket = Ticket {
            start: item.start,
            key,
        };
        lock(&session.outbox).deliver(ticket, Ok(o));
        let _ = reply.send(Ok(ack));
    }

    /// Whether `other` may run in the same pass: same slice, another session.
    pub fn joins(&self, batch: &[Pending]) -> bool {
        batch
            .iter()
            .all(|p| Arc::ptr_eq(&p.slice, &self.slice) && !Arc::ptr_eq(&p.session, &self.session))
    }
}

/// Steps going on to one next stage.
#[derive(Debug)]
pub struct Onward {
    /// Its address.
    pub addr: String,
    /// The plan epoch.
    pub epoch: PlanEpoch,
    /// Deadline and trace of the first step.
    pub ctx: Context,
    /// The steps with their activations, and where each outcome goes.
    pub items: Vec<(ForwardItem, Reply)>,
}

fn err(code: ErrorCode, d: impl Into<String>) -> ShardError {
    ShardError::new(code, d)
}

/// Checks one step and builds its input rows; reserves its cache.
fn admit(p: &Pending) -> Result<Tensor, ShardError> {
    let stage = &p.slice.stage;
    if p.session.epoch != p.slice.epoch {
        return Err(err(
            ErrorCode::EpochMismatch,
            format!("session is on epoch {}", p.session.epoch),
        ));
    }
    let mut s = lock(&p.session.state);
    if s.cache.len() != p.item.start as usize {
        return Err(shard_err(common::Error::PositionMismatch {
            cached: s.cache.len(),
            start: p.item.start as usize,
        }));
    }
    let x = match &p.item.input {
        StageInput::Tokens(t) => stage.embed(t).map_err(shard_err)?,
        StageInput::Hidden(w) => to_tensor(w, stage.device())?,
    };
    match x.dims() {
        [n, h] if *n > 0 && *h == stage.config().hidden => {}
        d => {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!(
                    "activations {d:?}, expected [n>0, {}]",
                    stage.config().hidden
                ),
            ))
        }
    }
    s.cache
        .reserve(x.dim(0).map_err(candle_err)?)
        .map_err(shard_err)?;
    let e = &p.session;
    e.kv_bytes.store(s.cache.nbytes() as u64, Ordering::Relaxed);
    e.last_used_ms.store(now_ms(), Ordering::Relaxed);
    Ok(x)
}

/// Runs one batch (all on one slice, each session once) and routes every outcome; the
/// activations going on to a next stage are sent as `activations`. `computed` is called once
/// the pass is done, before any outcome is sent on.
pub fn execute(
    batch: Vec<Pending>,
    onward: &mpsc::UnboundedSender<Onward>,
    metrics: &Metrics,
    activations: WireDType,
    computed: &mut dyn FnMut(),
) {
    let mut ok: Vec<(Pending, Tensor)> = Vec::with_capacity(batch.len());
    for p in batch {
        match admit(&p) {
            Ok(x) => ok.push((p, x)),
            Err(e) => {
                metrics
                    .item_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                p.finish(Err(e));
            }
        }
    }
    if ok.is_empty() {
        return;
    }
    let (pendings, xs): (Vec<Pending>, Vec<Tensor>) = ok.into_iter().unzip();
    let lens: Vec<usize> = xs.iter().map(|x| x.dims()[0]).collect();
    metrics.batch(pendings.len(), lens.iter().sum());
    let spans = super::trace::pass(&pendings, &lens);
    let r = run(&pendings, &xs, &lens, activations);
    drop(spans);
    computed();
    match r {
        Ok(outs) => {
            let mut groups: HashMap<String, Onward> = HashMap::new();
            for (p, out) in pendings.into_iter().zip(outs) {
                match out {
                    Out::Done(o) => match p.item.reply {
                        ReplyRoute::Collect(key) => {
                            metrics.direct_replies.fetch_add(1, Ordering::Relaxed);
                            p.finish_collected(key, o);
                        }
                        ReplyRoute::Chain => p.finish(Ok(o)),
                    },
                    Out::Next(addr, hidden) => {
                        // The activations going on are the next stage's to account for.
                        let Pending {
                            item,
                            slice,
                            ctx,
                            reply,
                            charge,
                            ..
                        } = p;
                        drop(charge);
                        let g = groups.entry(addr.clone()).or_insert_with(|| Onward {
                            addr,
                            epoch: slice.epoch,
                            ctx,
                            items: Vec::new(),
                        });
                        g.ctx.deadline = g.ctx.deadline.min(ctx.deadline);
                        let item = ForwardItem {
                            input: StageInput::Hidden(hidden),
                            ..item
                        };
                        g.items.push((item, reply));
                    }
                }
            }
            for g in groups.into_values() {
                if let Err(mpsc::error::SendError(g)) = onward.send(g) {
                    for (_, reply) in g.items {
                        let _ = reply.send(Err(err(ErrorCode::Internal, "the relay is gone")));
                    }
                }
            }
        }
        Err(e) => {
            metrics
                .item_errors
                .fetch_add(pendings.len() as u64, std::sync::atomic::Ordering::Relaxed);
            for p in pendings {
                p.finish(Err(e.clone()));
            }
        }
    }
}

enum Out {
    Done(ForwardOutput),
    Next(String, WireTensor),
}

fn set_pick(out: &mut Out, pick: Option<WirePick>, logits: Option<WireTensor>) {
    if let Out::Done(o) = out {
        o.pick = pick;
        o.logits = logits;
    }
}

fn run(
    pendings: &[Pending],
    xs: &[Tensor],
    lens: &[usize],
    activations: WireDType,
) -> Result<Vec<Out>, ShardError> {
    let stage = &pendings[0].slice.stage;
    let x = match xs {
        [x] => x.clone(),
        _ => Tensor::cat(xs, 0).map_err(candle_err)?,
    };
    // Each session once per batch (see `Pending::joins`), so these locks cannot deadlock.
    let mut guards: Vec<_> = pendings.iter().map(|p| lock(&p.session.state)).collect();
    let mut segs: Vec<Segment<'_>> = guards
        .iter_mut()
        .zip(pendings.iter().zip(xs))
        .map(|(g, (p, x))| Segment {
            cache: &mut g.cache,
            start: p.item.start as usize,
            len: x.dims()[0],
        })
        .collect();
    let y = stage.forward_batch(&x, &mut segs).map_err(shard_err)?;
    drop(segs);
    if stage.is_last() {
        // Only the items that pick a token or want logits need the head: a prompt's earlier
        // chunks do not.
        let mut need = Vec::with_capacity(lens.len());
        let mut at = 0u32;
        for (i, &n) in lens.iter().enumerate() {
            at += n as u32;
            let it = &pendings[i].item;
            if it.pick || it.want_logits {
                need.push((i, at - 1));
            }
        }
        let mut outs: Vec<Out> = pendings
            .iter()
            .map(|p| {
                Out::Done(ForwardOutput {
                    session: p.item.session,
                    pick: None,
                    logits: None,
                })
            })
            .collect();
        if need.is_empty() {
            return Ok(outs);
        }
        let last: Vec<u32> = need.iter().map(|&(_, r)| r).collect();
        let idx = Tensor::new(last.as_slice(), y.device()).map_err(candle_err)?;
        let rows = y.index_select(&idx, 0).map_err(candle_err)?;
        // Greedy sessions that want no logits back get their picks made where the logits
        // are (on a GPU, only the picks are copied to the host; on the CPU the logits stay
        // in scratch).
        if need.iter().all(|&(i, _)| {
            let it = &pendings[i].item;
            guards[i].sampler.is_greedy() && it.pick && !it.want_logits
        }) {
            let picks = stage.greedy_head(&rows).map_err(shard_err)?;
            for (&(i, _), token) in need.iter().zip(picks) {
                guards[i].sampler.record(token);
                set_pick(
                    &mut outs[i],
                    Some(wire_pick(Pick {
                        token,
                        logprobs: None,
                    })),
                    None,
                );
            }
            return Ok(outs);
        }
        let logits = stage.head(&rows).map_err(shard_err)?;
        let host: Vec<Vec<f32>> = logits.to_vec2().map_err(candle_err)?;
        for (j, (&(i, _), v)) in need.iter().zip(&host).enumerate() {
            let it = &pendings[i].item;
            let pick = if it.pick {
                Some(wire_pick(guards[i].sampler.pick(v).map_err(shard_err)?))
            } else {
                None
            };
            let wire = if it.want_logits {
                Some(to_wire(
                    &logits.get(j).map_err(candle_err)?,
                    WireDType::F32,
                )?)
            } else {
                None
            };
            set_pick(&mut outs[i], pick, wire);
        }
        Ok(outs)
    } else {
        let mut outs = Vec::with_capacity(lens.len());
        let mut at = 0;
        for (&n, g) in lens.iter().zip(&guards) {
            let addr = g
                .next
                .clone()
                .ok_or_else(|| err(ErrorCode::Internal, "no next stage"))?;
            let h = y.narrow(0, at, n).map_err(candle_err)?;
            outs.push(Out::Next(addr, to_wire(&h, activations)?));
            at += n;
        }
        Ok(outs)
    }
}
