//! The 2PC driver: coordinators campaign in an etcd election, and the leader watches
//! membership (`nodes/` minus `leaving/`). When the nodes differ from the served plan's, it
//! computes a new plan and applies it with [`crate::twopc`]; then the same for each model
//! loaded at run time (`models/` in etcd), each with its own plan. A plan that aborts is retried
//! when membership changes again, or after a back-off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use cluster_registry::{PlanKey, Registry};
use proto_types::registry::{NodeRecord, PlanRecord};
use tokio_util::sync::CancellationToken;

use crate::follow::{Complaint, EVERY};
use crate::model_set::ModelFiles;
use crate::serving::Serving;
use crate::twopc::TwoPc;

/// How long an aborted plan for the same nodes waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Options of the driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The 2PC parameters.
    pub twopc: TwoPc,
    /// Plan only once this many nodes are registered.
    pub min_nodes: usize,
    /// TTL of the election lease, in seconds.
    pub ttl_secs: i64,
    /// Where the files of models loaded at run time are.
    pub models_dir: std::path::PathBuf,
}

/// Campaigns, then drives until `stop`. Leadership is lost with the election lease; the
/// driver then campaigns again.
pub async fn run(cfg: DriverConfig, serving: Arc<Serving>, stop: CancellationToken) {
    let reg = cfg.twopc.registry.clone();
    loop {
        let lost = CancellationToken::new();
        let led = async {
            let lease = reg.grant(cfg.ttl_secs).await?;
            tokio::spawn(keep(
                reg.clone(),
                lease,
                cfg.ttl_secs,
                lost.clone(),
                stop.clone(),
            ));
            // waits while another coordinator leads; gives up when our lease is lost
            tokio::select! {
                r = reg.campaign(&cfg.twopc.who, lease) => r?,
                _ = lost.cancelled() => return Ok(()),
            }
            tracing::info!(who = cfg.twopc.who, "elected the 2PC driver");
            drive(&cfg, &serving, &lost).await;
            Ok::<(), cluster_registry::RegistryError>(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = led => if let Err(e) = r {
                tracing::warn!("driver election: {e}");
            },
        }
        lost.cancel();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps the election lease alive; cancels `lost` when it cannot.
async fn keep(
    reg: Registry,
    lease: i64,
    ttl: i64,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let half = Duration::from_millis(ttl.max(1) as u64 * 500);
    let alive = async {
        let (mut keeper, mut stream) = reg.keep_alive(lease).await?;
        loop {
            keeper.keep_alive().await?;
            // Fencing by time: a renewal not answered within half the TTL counts as lost, so
            // that a leader cut off from etcd stops driving before its lease can expire there
            // and another coordinator be elected (a stream over a cut connection just waits).
            let answer = tokio::time::timeout(half, stream.message()).await;
            match answer {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                Ok(Ok(_)) => return Ok::<(), cluster_registry::RegistryError>(()),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    tracing::warn!(?half, "no answer to the election lease's renewal");
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_secs((ttl as u64 / 3).max(1))).await;
        }
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = lost.cancelled() => {}
        r = alive => {
            if let Err(e) = r {
                tracing::warn!("election lease: {e}");
            }
            tracing::warn!("election lease lost: no longer the driver");
            lost.cancel();
        }
    }
}

fn same(a: &[NodeRecord], b: &[(String, String)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(n, (id, addr))| &n.id == id && &n.addr == addr)
}

/// The nodes a plan should have: those of `now` still active keep their place, new active
/// members go last.
fn desired(now: &[(String, String)], active: &[NodeRecord]) -> Vec<NodeRecord> {
    let mut out: Vec<NodeRecord> = now
        .iter()
        .filter_map(|(id, _)| active.iter().find(|m| &m.id == id).cloned())
        .collect();
    out.extend(
        active
            .iter()
            .filter(|m| !now.iter().any(|(id, _)| id == &m.id))
            .cloned(),
    );
    out
}

fn stages(p: &PlanRecord) -> Vec<(String, String)> {
    p.stages
        .iter()
        .map(|s| (s.node.clone(), s.addr.clone()))
        .collect()
}

/// Plans that failed, by plan key: not retried for the same nodes within [`RETRY_AFTER`].
#[derive(Debug, Default)]
struct Failed(HashMap<PlanKey, (Vec<(String, String)>, Instant)>);

impl Failed {
    fn recent(&self, key: &PlanKey, nodes: &[(String, String)]) -> bool {
        self.0
            .get(key)
            .is_some_and(|(k, at)| k == nodes && at.elapsed() < RETRY_AFTER)
    }
}

async fn drive(cfg: &DriverConfig, serving: &Serving, lost: &CancellationToken) {
    let reg = &cfg.twopc.registry;
    let mut complaint = Complaint::default();
    let mut bad_members = Complaint::default();
    let mut failed = Failed::default();
    let mut models = ModelFiles::new(cfg.models_dir.clone());
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Reads that outlast the leadership (a call stuck on a cut connection, answered when
        // it heals) must not lead to a plan: they are dropped when the lease is lost.
        let read = tokio::select! {
            r = async { futures::try_join!(reg.members(), reg.leaving(), reg.plan(), reg.models()) } => r,
            _ = lost.cancelled() => return,
        };
        let ((members, bad), leaving, plan, (loaded, bad_models)) = match read {
            Ok(x) => x,
            Err(e) => {
                complaint.error(format!("not re-planning: {e}"));
                continue;
            }
        };
        if !bad.is_empty() || !bad_models.is_empty() {
            let all: Vec<String> = bad.into_iter().chain(bad_models).collect();
            bad_members.error(format!("ignoring records: {}", all.join("; ")));
        }
        let active: Vec<NodeRecord> = members
            .into_iter()
            .filter(|m| !leaving.contains(&m.id))
            .collect();
        if !replan_base(
            cfg,
            serving,
            &active,
            plan,
            &mut failed,
            &mut complaint,
            lost,
        )
        .await
        {
            continue;
        }
        // The models loaded at run time follow the same members, once the base model's plan
        // is settled.
        for m in loaded {
            if lost.is_cancelled() {
                return;
            }
            let now = stages(&m.plan);
            let want = desired(&now, &active);
            if want.is_empty() || same(&want, &now) {
                continue;
            }
            let key = PlanKey::Model(m.id.clone());
            let nodes: Vec<(String, String)> = want
                .iter()
                .map(|n| (n.id.clone(), n.addr.clone()))
                .collect();
            if failed.recent(&key, &nodes) {
                continue;
            }
            let model = match models.get(&m.plan).await {
                Ok(x) => x.model.clone(),
                Err(e) => {
                    complaint.error(format!("not re-planning {}: {e}", m.id));
                    continue;
                }
            };
            tracing::info!(model = m.id, nodes = ?nodes, "membership changed: re-planning");
            let twopc = TwoPc {
                model,
                key: key.clone(),
                max_ctx: m.plan.max_ctx as usize,
                ..cfg.twopc.clone()
            };
            match twopc.apply(&want, m.rev).await {
                // every coordinator, this one too, serves it by following `models/`
                Ok(_) => {
                    failed.0.remove(&key);
                }
                Err(e) => {
                    tracing::error!(model = m.id, "re-plan failed: {e}");
                    failed.0.insert(key, (nodes, Instant::now()));
                }
            }
        }
    }
}

/// The base model's step: re-plans it when its nodes differ from the active members. Whether
/// its plan is settled (the other models' re-plans wait until it is).
async fn replan_base(
    cfg: &DriverConfig,
    serving: &Serving,
    active: &[NodeRecord],
    plan: Option<(PlanRecord, i64)>,
    failed: &mut Failed,
    complaint: &mut Complaint,
    lost: &CancellationToken,
) -> bool {
    let served = serving.current().ok();
    if let (Some((p, _)), Some(c)) = (&plan, &served) {
        if p.epoch < c.epoch {
            complaint.error(format!(
                "not re-planning: the plan in etcd (epoch {}) is behind the served {}",
                p.epoch, c.epoch
            ));
            return false;
        }
    }
    // The served plan's stages, in order: the ones still members keep their place, new
    // members go last.
    let now: Vec<(String, String)> = match (&served, &plan) {
        (Some(c), _) => c
            .record()
            .stages
            .into_iter()
            .map(|s| (s.node, s.addr))
            .collect(),
        (None, Some((p, _))) => stages(p),
        (None, None) => Vec::new(),
    };
    let want = desired(&now, active);
    if want.is_empty() || (served.is_none() && want.len() < cfg.min_nodes) {
        complaint.clear();
        return served.is_some();
    }
    if same(&want, &now) {
        complaint.clear();
        return true;
    }
    let key: Vec<(String, String)> = want
        .iter()
        .map(|m| (m.id.clone(), m.addr.clone()))
        .collect();
    if failed.recent(&PlanKey::Base, &key) || lost.is_cancelled() {
        return false;
    }
    let rev = plan.as_ref().map_or(0, |p| p.1);
    tracing::info!(nodes = ?key, "membership changed: re-planning");
    match cfg.twopc.apply(&want, rev).await {
        Ok(c) => {
            failed.0.remove(&PlanKey::Base);
            complaint.clear();
            serving.replace(c);
            true
        }
        Err(e) => {
            tracing::error!("re-plan failed: {e}");
            failed.0.insert(PlanKey::Base, (key, Instant::now()));
            false
        }
    }
}
