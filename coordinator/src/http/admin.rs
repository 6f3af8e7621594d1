//! The admin API, on when `coordinator serve --admin-key KEY` is given (every call needs
//! `Authorization: Bearer KEY`; without the flag the routes do not exist): the models served,
//! and models loaded and unloaded while the others go on serving.
//!
//! - `GET /admin/models`: each model's id, file, plan epoch and stages.
//! - `POST /admin/models` `{"file": "NAME.gguf"}`: plans the file (in the coordinator's models
//!   folder, and the nodes') over the nodes beside the models served, and serves it as
//!   `NAME`. A load that fails (it does not fit, a node lacks the file) leaves nothing: the
//!   connections it opened close, and with their leases the nodes free what they loaded.
//! - `DELETE /admin/models/{id}`: stops routing requests to the model, lets those running
//!   finish (up to the drain time), then closes its connections: every node frees its slices
//!   and sessions with the lease.
//! - `POST /admin/models/switch` `{"from": ID, "to": "NAME.gguf"}`: a load of the new model
//!   and an unload of the old, in that order when both fit, else the reverse (said in the
//!   answer's `order`).
//!
//! With etcd, a load is a two-phase commit of the model's plan at `models/<id>` over the
//! registered nodes (PREPARE loads beside what is served; the decision is recorded in etcd;
//! COMMIT makes it routable), and an unload deletes that plan and records the unload: every
//! coordinator follows the set ([`crate::model_set`]) and every node frees the slices. The
//! base model (`--model`) stays.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use cluster_registry::{PlanKey, Registry, RegistryError};
use proto_types::PlanEpoch;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad, ApiError, AppState, ServedModel};
use crate::cluster::Cluster;
use crate::model_set::ModelFile;
use crate::serving::Serving;
use crate::twopc::{Failpoint, TwoPc};

/// What a load is planned over.
#[derive(Debug)]
pub enum Placement {
    /// These nodes (static membership), first stage first; each load takes the next epoch.
    Static {
        /// The nodes.
        nodes: Vec<String>,
        /// The epoch of the next load's plan.
        next_epoch: AtomicU64,
    },
    /// The registered nodes, by a two-phase commit recorded in etcd.
    Etcd {
        /// etcd.
        registry: Box<Registry>,
        /// This coordinator, as recorded in decisions.
        who: String,
        /// Where the 2PC stops, in tests.
        failpoint: Option<Failpoint>,
    },
}

/// What loads need: where models come from and what they are planned over.
#[derive(Debug)]
pub struct Admin {
    /// Static nodes, or etcd.
    pub placement: Placement,
    /// Where model files are, here (the nodes have their own folder with the same files).
    pub models_dir: PathBuf,
    /// The context bound asked for (each model's own bound caps it).
    pub max_ctx: usize,
    /// How long an unload waits for the model's running requests.
    pub drain: Duration,
}

impl Admin {
    /// Loads planned over static `nodes`, from epoch `next_epoch` on.
    pub fn fixed(
        nodes: Vec<String>,
        models_dir: PathBuf,
        max_ctx: usize,
        drain: Duration,
        next_epoch: u64,
    ) -> Self {
        Admin {
            placement: Placement::Static {
                nodes,
                next_epoch: AtomicU64::new(next_epoch),
            },
            models_dir,
            max_ctx,
            drain,
        }
    }

    /// The base model, which an etcd cluster's coordinators all name: it is not unloaded.
    fn pinned<'a>(&self, st: &AppState, id: &'a str) -> Option<&'a str> {
        let etcd = matches!(self.placement, Placement::Etcd { .. });
        let base = st.models().first().is_some_and(|m| m.id == id);
        (etcd && base).then_some(id)
    }
}

/// The admin routes (mounted behind the admin key).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/models", get(list).post(load))
        .route("/admin/models/switch", post(switch))
        .route("/admin/models/{id}", delete(unload))
}

fn admin(st: &AppState) -> Result<&Admin, ApiError> {
    st.admin.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the admin API is not set up on this coordinator".into(),
            "server_error",
        )
    })
}

fn etcd_error(e: RegistryError) -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("etcd: {e}"),
        "server_error",
    )
}

async fn list(State(st): State<Arc<AppState>>) -> Json<Value> {
    let models: Vec<Value> = st
        .models()
        .iter()
        .map(|m| {
            let plan = m.serving.current().ok();
            json!({
                "id": m.id,
                "epoch": plan.as_ref().map(|c| c.epoch.0),
                "file": plan.as_ref().map(|c| c.model.name.clone()),
                "stages": plan.as_ref().map(|c| c.nodes.iter().map(|n| json!({
                    "address": n.addr, "layers": [n.range.start(), n.range.end()],
                    "weight_bytes": n.weight_bytes,
                })).collect::<Vec<_>>()),
            })
        })
        .collect();
    Json(json!({"models": models}))
}

/// `POST /admin/models`.
#[derive(Debug, Deserialize)]
struct LoadRequest {
    /// A GGUF file name in the models folder.
    file: String,
}

/// `POST /admin/models/switch`.
#[derive(Debug, Deserialize)]
struct SwitchRequest {
    /// The id of the model served now.
    from: String,
    /// The GGUF file name of the model to serve instead.
    to: String,
}

fn conflict(message: String) -> ApiError {
    ApiError(StatusCode::CONFLICT, message, "invalid_request_error")
}

/// A load refused before anything was planned (`Err`), or its plan's outcome (`Ok`: the id
/// and epoch served, or why the plan failed, having left nothing loaded).
type LoadOutcome = Result<Result<(String, PlanEpoch), ApiError>, ApiError>;

/// Loads `file` beside the models served (the caller holds `AppState::changing`).
async fn load_file(st: &AppState, admin: &Admin, file: &str) -> LoadOutcome {
    if file.contains(['/', '\\']) || !file.ends_with(".gguf") || file.starts_with('.') {
        return Err(bad(format!(
            "`{file}` is not a GGUF file name in the models folder, such as model.gguf"
        )));
    }
    let id = file.trim_end_matches(".gguf").to_string();
    if st.models().iter().any(|m| m.id == id) {
        return Err(conflict(format!("`{id}` is served already")));
    }
    let path = admin.models_dir.join(file);
    if !path.is_file() {
        return Err(bad(format!(
            "{file} is not in the models folder {}",
            admin.models_dir.display()
        )));
    }
    let f = ModelFile::read(path, admin.max_ctx)
        .await
        .map_err(|e| bad(format!("{file}: {e}")))?;
    let (cluster, epoch) = match &admin.placement {
        Placement::Static { nodes, next_epoch } => {
            let epoch = PlanEpoch(next_epoch.fetch_add(1, Ordering::Relaxed));
            match Cluster::start(nodes, f.model.clone(), f.max_ctx, epoch).await {
                Ok(c) => (Arc::new(c), epoch),
                Err(e) => return Ok(Err(bad(format!("{file} cannot be served: {e}")))),
            }
        }
        Placement::Etcd {
            registry,
            who,
            failpoint,
        } => {
            let key = PlanKey::Model(id.clone());
            let read = futures::try_join!(
                registry.members(),
                registry.leaving(),
                registry.plan_at(&key)
            );
            let ((members, _), leaving, there) = read.map_err(etcd_error)?;
            if there.is_some() {
                return Err(conflict(format!(
                    "`{id}` has a plan in etcd already (another coordinator loaded it)"
                )));
            }
            let active: Vec<_> = members
                .into_iter()
                .filter(|m| !leaving.contains(&m.id))
                .collect();
            if active.is_empty() {
                return Ok(Err(bad(format!(
                    "{file} cannot be served: no node is registered"
                ))));
            }
            let twopc = TwoPc {
                registry: (**registry).clone(),
                model: f.model.clone(),
                key,
                max_ctx: f.max_ctx,
                who: who.clone(),
                failpoint: *failpoint,
            };
            match twopc.apply(&active, 0).await {
                Ok(c) => {
                    let epoch = c.epoch;
                    (c, epoch)
                }
                Err(e) => return Ok(Err(bad(format!("{file} cannot be served: {e}")))),
            }
        }
    };
    let serving = Arc::new(Serving::default());
    serving.replace(cluster);
    let m = Arc::new(ServedModel::new(id.clone(), serving, f.tok.clone()));
    st.models.write().unwrap_or_else(|e| e.into_inner()).push(m);
    tracing::info!(model = %id, %epoch, "model loaded");
    Ok(Ok((id, epoch)))
}

/// Waits for the requests running on `m` (up to `drain`), then ends its leases: every node
/// frees the sessions, and the slices its connections own. Whether its requests had all
/// ended. (`m` is no longer routed to.)
pub async fn retire(m: Arc<ServedModel>, drain: Duration) -> bool {
    // Those running hold its plan until they end (the plan is held here and by its
    // `Serving` besides).
    let plan = m.serving.current().ok();
    let running = || plan.as_ref().is_some_and(|c| Arc::strong_count(c) > 2);
    let deadline = tokio::time::Instant::now() + drain;
    while running() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = !running();
    drop(plan);
    m.serving.stop_heartbeats();
    drained
}

/// Unloads `id` (the caller holds `AppState::changing`): no new request reaches it, those running get up
/// to the drain time, then its connections close and the nodes free its slices. Whether
/// its requests had all ended.
async fn unload_id(
    st: &AppState,
    admin: &Admin,
    id: &str,
    last_too: bool,
) -> Result<bool, ApiError> {
    if let Some(id) = admin.pinned(st, id) {
        return Err(conflict(format!(
            "`{id}` is the base model of this etcd cluster (every coordinator's --model): it stays; change --model and restart the coordinators to replace it"
        )));
    }
    let m = {
        let mut models = st.models.write().unwrap_or_else(|e| e.into_inner());
        let i = models.iter().position(|m| m.id == id).ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("The model `{id}` is not served"),
                "invalid_request_error",
            )
        })?;
        if models.len() == 1 && !last_too {
            return Err(conflict(format!(
                "`{id}` is the only model served; load another first, or switch"
            )));
        }
        models.remove(i)
    };
    let drained = retire(m, admin.drain).await;
    // With etcd: its plan goes, and the unload is recorded, so that every coordinator stops
    // serving it and every node frees its slices (a re-plan committed meanwhile changes the
    // plan's revision: read it again).
    if let Placement::Etcd { registry, who, .. } = &admin.placement {
        let key = PlanKey::Model(id.to_string());
        let mut tries = 0;
        loop {
            let Some((_, rev)) = registry.plan_at(&key).await.map_err(etcd_error)? else {
                break;
            };
            match registry.unload_model(id, rev, who).await {
                Ok(rec) => {
                    tracing::info!(model = %id, epoch = %rec.epoch, "unload recorded in etcd");
                    break;
                }
                Err(RegistryError::Conflict(e)) if tries < 5 => {
                    tracing::info!(model = %id, "unloading: {e}; again");
                    tries += 1;
                }
                Err(e) => return Err(etcd_error(e)),
            }
        }
    }
    tracing::info!(model = %id, drained, "model unloaded");
    Ok(drained)
}

async fn load(
    State(st): State<Arc<AppState>>,
    body: Result<Json<LoadRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    let admin = admin(&st)?;
    let _one = st.changing.lock().await;
    let (id, epoch) = load_file(&st, admin, &req.file).await??;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "epoch": epoch.0})),
    ))
}

async fn unload(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let admin = admin(&st)?;
    let _one = st.changing.lock().await;
    let drained = unload_id(&st, admin, &id, false).await?;
    Ok(Json(json!({"id": id, "drained": drained})))
}

/// A switch: the new model loaded, then the old one unloaded; when the new one does not fit
/// beside the old, the old one first, then the new (requests for either get 404 between).
async fn switch(
    State(st): State<Arc<AppState>>,
    body: Result<Json<SwitchRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    let admin = admin(&st)?;
    let _one = st.changing.lock().await;
    if !st.models().iter().any(|m| m.id == req.from) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("The model `{}` is not served", req.from),
            "invalid_request_error",
        ));
    }
    if let Some(id) = admin.pinned(&st, &req.from) {
        return Err(conflict(format!(
            "`{id}` is the base model of this etcd cluster (every coordinator's --model): it stays; load the new model beside it instead"
        )));
    }
    let (order, (id, epoch), drained) = match load_file(&st, admin, &req.to).await? {
        Ok(loaded) => {
            let drained = unload_id(&st, admin, &req.from, true).await?;
            ("load, then unload", loaded, drained)
        }
        Err(beside) => {
            tracing::info!(from = %req.from, to = %req.to, "the new model does not fit beside the old one ({}): unloading first", beside.1);
            let drained = unload_id(&st, admin, &req.from, true).await?;
            let loaded = load_file(&st, admin, &req.to).await?.map_err(|e| {
                ApiError(
                    e.0,
                    format!("`{}` was unloaded, but {}", req.from, e.1),
                    e.2,
                )
            })?;
            ("unload, then load", loaded, drained)
        }
    };
    Ok(Json(
        json!({"unloaded": req.from, "loaded": id, "epoch": epoch.0,
                   "order": order, "drained": drained}),
    ))
}
