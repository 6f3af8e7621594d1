//! The two-phase commit of a new plan. One driver at a time runs it (see [`crate::driver`]):
//!
//! 1. **PREPARE(E+1)**: every node of the new plan loads its slice beside the one it serves,
//!    held by this coordinator's lease, and votes: `Ok` is YES; an error (it does not fit
//!    the memory limit, the file is missing, the node is unreachable) is NO.
//! 2. **Decision**: written to etcd before any node hears it, in one transaction guarded on
//!    no decision for E+1 yet and on the plan key being unchanged. COMMIT writes the plan
//!    too.
//! 3. **COMMIT** or **ABORT** to every node. A node that does not hear it reads the decision
//!    from etcd; with no decision by its prepare timeout, it records an ABORT itself, and the
//!    driver's COMMIT transaction then fails.

use std::sync::Arc;

use cluster_registry::{PlanKey, Registry};
use proto_types::registry::{Decision, NodeRecord, PlanRecord, StageRecord};
use proto_types::PlanEpoch;

use tracing::Instrument;

use crate::cluster::{ctx, rpc, Cluster, ModelRef, NodeConn};
use crate::error::{CoordError, Result};
use crate::timeouts::TIMEOUTS;

/// Test hooks: the driver stops at a point of the protocol, printing
/// `failpoint NAME epoch E` on stdout, and waits to be killed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Failpoint {
    /// After every node voted YES, before the decision is written.
    AfterPrepare,
    /// After COMMIT is written to etcd, before any node hears it.
    AfterDecision,
    /// After every node voted YES on the plan of a model loaded at run time (the admin API),
    /// before the decision is written.
    LoadAfterPrepare,
}

/// What a 2PC run needs.
#[derive(Debug, Clone)]
pub struct TwoPc {
    /// etcd.
    pub registry: Registry,
    /// The model.
    pub model: Arc<ModelRef>,
    /// Where its plan is kept: the base model's `plan`, or `models/<id>`.
    pub key: PlanKey,
    /// Context bound of every session.
    pub max_ctx: usize,
    /// This coordinator, as recorded in decisions.
    pub who: String,
    /// Where to stop, in tests.
    pub failpoint: Option<Failpoint>,
}

async fn failpoint(at: Option<Failpoint>, here: Failpoint, epoch: PlanEpoch) {
    if at == Some(here) {
        use std::io::Write;
        let name = match here {
            Failpoint::AfterPrepare => "after-prepare",
            Failpoint::AfterDecision => "after-decision",
            Failpoint::LoadAfterPrepare => "load-after-prepare",
        };
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "failpoint {name} epoch {epoch}");
            let _ = out.flush();
        }
        std::future::pending::<()>().await;
    }
}

impl TwoPc {
    /// Moves the cluster to a plan over `members` (first stage first). `plan_rev` is the
    /// revision of the plan key this was computed from (0: none). Returns the committed
    /// cluster, or why the plan was aborted.
    ///
    /// Each run is a trace of its own (`plan change`): connecting, PREPARE with each vote as
    /// an event, the decision in etcd, then COMMIT or ABORT; every node's RPC spans are in it.
    pub async fn apply(&self, members: &[NodeRecord], plan_rev: i64) -> Result<Arc<Cluster>> {
        let span = tracing::info_span!(
            parent: None,
            "plan change",
            plan = %self.key,
            epoch = tracing::field::Empty,
            nodes = members.len(),
            decision = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let r = self.run(members, plan_rev).instrument(span.clone()).await;
        match &r {
            Ok(_) => span.record("decision", "COMMIT"),
            Err(_) => span
                .record("decision", "ABORT")
                .record("otel.status_code", "ERROR"),
        };
        r
    }

    async fn run(&self, members: &[NodeRecord], plan_rev: i64) -> Result<Arc<Cluster>> {
        let epoch = self.registry.next_epoch().await?;
        tracing::Span::current().record("epoch", epoch.0);
        let conns = futures::future::try_join_all(
            members
                .iter()
                .map(|m| NodeConn::open(Some(m.id.clone()), &m.addr)),
        )
        .await?;
        // Until the committed cluster's own heartbeats take over (preparing loads slices).
        let _alive: Vec<_> = conns.iter().map(NodeConn::keep_alive).collect();
        let capacity: Vec<u64> = conns.iter().map(NodeConn::capacity).collect();
        let ranges = self.model.split(&capacity)?;
        tracing::info!(%epoch, ?ranges, "PREPARE");
        let votes = futures::future::join_all(conns.iter().zip(&ranges).map(|(c, &r)| {
            let req = NodeConn::load_req(&self.model, r, epoch, self.max_ctx);
            async move {
                let v = rpc(
                    &c.addr,
                    c.client.prepare_slice(ctx(TIMEOUTS.load), req).await,
                );
                match &v {
                    Ok(_) => tracing::info!(node = c.addr, layers = %r, "vote YES"),
                    Err(e) => tracing::info!(node = c.addr, layers = %r, "vote NO: {e}"),
                }
                v
            }
        }))
        .instrument(tracing::info_span!("prepare", %epoch))
        .await;
        let no: Vec<String> = votes
            .iter()
            .zip(&conns)
            .filter_map(|(v, c)| v.as_ref().err().map(|e| format!("{}: {e}", c.addr)))
            .collect();
        if !no.is_empty() {
            let why = format!("{} voted NO: {}", no.len(), no.join("; "));
            let d = self
                .registry
                .decide_abort(epoch, &format!("{}: {why}", self.who))
                .instrument(tracing::info_span!("decide in etcd", %epoch, decision = "ABORT"))
                .await;
            self.abort_all(&conns, epoch).await;
            if let Err(e) = d {
                tracing::warn!(%epoch, "recording the abort: {e}");
            }
            return Err(CoordError::Plan(format!("epoch {epoch} aborted: {why}")));
        }
        let at = match self.key {
            PlanKey::Base => Failpoint::AfterPrepare,
            PlanKey::Model(_) => Failpoint::LoadAfterPrepare,
        };
        failpoint(self.failpoint, at, epoch).await;
        let plan = PlanRecord {
            epoch,
            model: self.model.name.clone(),
            sha256: self.model.sha256.clone(),
            max_ctx: self.max_ctx as u32,
            stages: conns
                .iter()
                .zip(&ranges)
                .map(|(c, r)| StageRecord {
                    node: c.id.clone().unwrap_or_else(|| c.addr.clone()),
                    addr: c.addr.clone(),
                    start: r.start(),
                    end: r.end(),
                })
                .collect(),
        };
        let decided = self
            .registry
            .decide_commit(&self.key, &plan, plan_rev, &self.who)
            .instrument(tracing::info_span!("decide in etcd", %epoch, decision = "COMMIT"))
            .await;
        match decided {
            Ok(d) if d.decision == Decision::Commit => {}
            other => {
                let why = match other {
                    Ok(d) => format!("{} decided ABORT first", d.by),
                    Err(e) => e.to_string(),
                };
                self.abort_all(&conns, epoch).await;
                return Err(CoordError::Plan(format!("epoch {epoch} aborted: {why}")));
            }
        }
        tracing::info!(%epoch, "COMMIT recorded in etcd");
        failpoint(self.failpoint, Failpoint::AfterDecision, epoch).await;
        let commits = futures::future::join_all(conns.iter().map(|c| async move {
            rpc(
                &c.addr,
                c.client.commit_slice(ctx(TIMEOUTS.commit), epoch).await,
            )
        }))
        .instrument(tracing::info_span!("commit", %epoch))
        .await;
        for (r, c) in commits.iter().zip(&conns) {
            if let Err(e) = r {
                // It reads the decision from etcd instead.
                tracing::warn!(%epoch, addr = c.addr, "COMMIT not delivered: {e}");
            }
        }
        let stages = conns
            .into_iter()
            .zip(ranges)
            .zip(votes)
            .filter_map(|((c, r), v)| v.ok().map(|info| (c, r, info)))
            .collect();
        Ok(Arc::new(Cluster::assemble(
            stages,
            self.model.clone(),
            self.max_ctx,
            epoch,
        )))
    }

    async fn abort_all(&self, conns: &[NodeConn], epoch: PlanEpoch) {
        futures::future::join_all(conns.iter().map(|c| async move {
            if let Err(e) = rpc(
                &c.addr,
                c.client.abort_slice(ctx(TIMEOUTS.abort), epoch).await,
            ) {
                tracing::warn!(%epoch, addr = c.addr, "ABORT not delivered: {e}");
            }
        }))
        .instrument(tracing::info_span!("abort", %epoch))
        .await;
    }
}
