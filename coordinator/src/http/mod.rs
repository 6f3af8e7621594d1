//! The OpenAI-compatible HTTP API (axum).
//!
//! # Layout
//! - [`openai`]: request and response shapes.
//! - [`trace`]: the request's root span (GenAI conventions, W3C trace context).
//! - [`auth`]: API keys.
//! - [`tls`]: the API over HTTPS.
//! - `generation`: the completion and chat handlers, whole or streamed (SSE).
//! - this module: routes, the other handlers, errors.

pub mod admin;
pub mod auth;
mod generation;
pub mod openai;
mod respond;
pub mod stats;
pub mod tls;
pub mod trace;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::tokenizer::TextTokenizer;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::cluster::Cluster;
use crate::error::CoordError;
use crate::serving::Serving;
use openai::*;
use trace::RequestSpan;

/// One model the coordinator serves: its plan, tokenizer and grammar compiler.
#[derive(Debug)]
pub struct ServedModel {
    /// Its id (the file name without `.gguf`), what requests name in `model`.
    pub id: String,
    /// The plan new requests run on.
    pub serving: Arc<Serving>,
    /// The tokenizer.
    pub tok: Arc<TextTokenizer>,
    /// The grammar compiler of the model's vocabulary, built at the first request with a
    /// `response_format`, to refuse grammars that do not compile with a 400.
    pub grammar: std::sync::OnceLock<Result<Arc<common::grammar::GrammarCompiler>, String>>,
}

impl ServedModel {
    /// A model served by `serving`, as `id`.
    pub fn new(id: String, serving: Arc<Serving>, tok: Arc<TextTokenizer>) -> Self {
        ServedModel {
            id,
            serving,
            tok,
            grammar: Default::default(),
        }
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// The models served, the default (for requests that name none) first.
    pub models: std::sync::RwLock<Vec<Arc<ServedModel>>>,
    /// Loads and unloads at run time.
    pub admin: Option<admin::Admin>,
    /// Held by each change of the set of models (an admin load, unload or switch; a step of
    /// following the set in etcd), so that they happen one at a time.
    pub changing: tokio::sync::Mutex<()>,
    /// Admission: one permit per running request.
    pub admission: Arc<Semaphore>,
    /// Requests served, for /metrics.
    pub requests: AtomicU64,
    /// Latency histograms and token counters, for /metrics.
    pub stats: Arc<stats::RequestStats>,
    /// The etcd client, with etcd membership (its counts go to /metrics).
    pub etcd: Option<cluster_registry::Registry>,
}

/// The router: `/v1/*`, `/tokenize` and `/detokenize` behind `api_keys`, `/metrics` behind
/// `metrics_keys` (either open when it has none), `/admin/*` behind `admin_key` (and absent
/// without one), `/health` always open.
pub fn router(
    state: Arc<AppState>,
    api_keys: auth::Keys,
    metrics_keys: auth::Keys,
    admin_key: Option<String>,
) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(generation::completions))
        .route("/v1/chat/completions", post(generation::chat))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/cluster", get(cluster))
        .layer(axum::middleware::from_fn_with_state(
            api_keys,
            auth::require,
        ));
    let metrics =
        Router::new()
            .route("/metrics", get(metrics))
            .layer(axum::middleware::from_fn_with_state(
                metrics_keys,
                auth::require,
            ));
    let api = match admin_key {
        Some(key) => api.merge(admin::routes().layer(axum::middleware::from_fn_with_state(
            auth::Keys::new(vec![key]),
            auth::require,
        ))),
        None => api,
    };
    api.merge(metrics)
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .with_state(state)
}

/// An error as OpenAI's JSON.
pub struct ApiError(StatusCode, String, &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // the one 404 a request gets is a model it names that is not served
        let missing = self.0 == StatusCode::NOT_FOUND;
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.1,
                kind: self.2.into(),
                param: missing.then(|| "model".into()),
                code: missing.then(|| "model_not_found".into()),
            },
        };
        (self.0, Json(body)).into_response()
    }
}

impl From<CoordError> for ApiError {
    /// Client mistakes and limits say what to change; failures inside the cluster (node
    /// addresses, node errors, the runtime's own) go to the log, and the client gets a
    /// message without them.
    fn from(e: CoordError) -> Self {
        let (status, kind, message) = match &e {
            CoordError::BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                e.to_string(),
            ),
            CoordError::Busy(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                e.to_string(),
            ),
            CoordError::Shard { err, .. }
                if err.code == proto_types::ErrorCode::ResourceExhausted =>
            {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "the cluster has no room for this request now; retry later".to_string(),
                )
            }
            CoordError::NoPlan(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                e.to_string(),
            ),
            CoordError::NodeDown { .. } | CoordError::Shard { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "a stage of the cluster is unavailable; retry later".to_string(),
            ),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal error; the coordinator's log has the details".to_string(),
            ),
        };
        if status.is_server_error() || matches!(e, CoordError::Shard { .. }) {
            tracing::warn!(status = status.as_u16(), "request failed: {e}");
        }
        ApiError(status, message, kind)
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into(), "invalid_request_error")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `POST /tokenize`: the ids of a text, special tokens parsed, BOS as asked (`add_special`,
/// default false, for llama.cpp's `content`; `add_special_tokens`, default true, for vLLM's
/// `prompt`), as those servers answer it.
async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Json<TokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    let m = st.model(req.model.as_deref())?;
    // llama.cpp's `add_special` defaults to false, vLLM's `add_special_tokens` to true.
    let add_special = match (req.add_special, req.add_special_tokens, &req.content) {
        (Some(a), _, _) | (None, Some(a), _) => a,
        (None, None, content) => content.is_none(),
    };
    let text = req
        .content
        .or(req.prompt)
        .ok_or_else(|| bad("give the text as `content` (or `prompt`)"))?;
    let ids = m
        .tok
        .encode_with(&text, add_special)
        .map_err(CoordError::from)?;
    let max = m.serving.current().map(|c| c.max_ctx).ok();
    Ok(Json(
        json!({"tokens": ids, "count": ids.len(), "max_model_len": max}),
    ))
}

/// `POST /detokenize`: the text of token ids, special tokens rendered, so that it tokenizes
/// back to the same ids.
async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Json<DetokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    let m = st.model(req.model.as_deref())?;
    let vocab = m.tok.vocab_size();
    if let Some(bad_id) = req.tokens.iter().find(|&&i| i as usize >= vocab) {
        return Err(bad(format!(
            "token id {bad_id} is outside the vocabulary of {vocab}"
        )));
    }
    let text = m.tok.decode_all(&req.tokens).map_err(CoordError::from)?;
    Ok(Json(json!({"content": text, "prompt": text})))
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "llm-cluster"})
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = st.models().iter().map(|m| model_object(&m.id)).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: a served model, or OpenAI's 404 `model_not_found`.
async fn model(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    let m = st.model(Some(&id))?;
    Ok(Json(model_object(&m.id)))
}

/// Every node's status, asked concurrently; `None` for a node that is down.
async fn statuses(c: &Cluster) -> Vec<Option<proto_types::NodeStatus>> {
    node_statuses(c.nodes.iter()).await
}

/// The status of each of `nodes`, asked concurrently; `None` for a node that is down.
async fn node_statuses<'a>(
    nodes: impl Iterator<Item = &'a crate::cluster::StageNode>,
) -> Vec<Option<proto_types::NodeStatus>> {
    futures::future::join_all(nodes.map(|n| async move {
        match n.client() {
            Ok(c) => c
                .status(crate::cluster::ctx(crate::timeouts::TIMEOUTS.heartbeat))
                .await
                .ok(),
            Err(_) => None,
        }
    }))
    .await
}

fn kind_sum(s: &proto_types::NodeStatus, f: impl Fn(&proto_types::LeaseBytes) -> u64) -> u64 {
    s.leases.iter().map(f).sum()
}

/// `GET /v1/cluster`: the default model's plan and nodes at the top level (as before several
/// models were served), and every model's under `models`.
async fn cluster(State(st): State<Arc<AppState>>) -> Json<Value> {
    let plans: Vec<(String, Option<Arc<Cluster>>)> = st
        .models()
        .iter()
        .map(|m| (m.id.clone(), m.serving.current().ok()))
        .collect();
    // the models share their nodes: each node is asked once, through the first plan with it
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&crate::cluster::StageNode> = plans
        .iter()
        .filter_map(|(_, c)| c.as_deref())
        .flat_map(|c| c.nodes.iter())
        .filter(|n| seen.insert(n.addr.clone()))
        .collect();
    let status: std::collections::HashMap<&str, Option<proto_types::NodeStatus>> = unique
        .iter()
        .map(|n| n.addr.as_str())
        .zip(node_statuses(unique.iter().copied()).await)
        .collect();
    let mut models = Vec::new();
    for (id, c) in &plans {
        let mut plan = model_plan(c.as_deref(), &status);
        plan["model"] = json!(id);
        models.push(plan);
    }
    let mut top = models.first().cloned().unwrap_or_else(|| json!({}));
    if let Some(o) = top.as_object_mut() {
        o.remove("model");
    }
    top["models"] = Value::Array(models);
    Json(top)
}

/// One model's plan: its epoch and its nodes, each with its status (by address).
fn model_plan(
    c: Option<&Cluster>,
    statuses: &std::collections::HashMap<&str, Option<proto_types::NodeStatus>>,
) -> Value {
    let Some(c) = c else {
        return json!({"epoch": null, "nodes": []});
    };
    let mut nodes = Vec::new();
    for n in &c.nodes {
        let status = statuses.get(n.addr.as_str()).cloned().flatten();
        let memory = status.as_ref().map(|s| {
            json!({
                "attributed_bytes": s.attributed_bytes,
                "weights_bytes": kind_sum(s, |l| l.weights),
                "prepared_bytes": kind_sum(s, |l| l.prepared),
                "kv_cache_bytes": kind_sum(s, |l| l.kv_cache),
                "prefix_cache_bytes": kind_sum(s, |l| l.prefix_cache),
                "activation_bytes": kind_sum(s, |l| l.activations),
                "memory_limit": s.memory_limit,
                "device_total_bytes": s.device_total_bytes,
                "device_free_bytes": s.device_free_bytes,
                "process_rss_bytes": s.process_rss_bytes,
                "baseline_bytes": s.baseline_bytes,
                "unattributed_bytes": s.unattributed_bytes,
                "leases": s.leases.iter().map(|l| json!({
                    "lease": l.lease.map(|l| l.0), "client": l.client,
                    "weights": l.weights, "prepared": l.prepared,
                    "kv_cache": l.kv_cache, "activations": l.activations,
                    "prefix_cache": l.prefix_cache,
                })).collect::<Vec<_>>(),
            })
        });
        nodes.push(json!({
            "id": n.id,
            "address": n.addr, "device": n.device,
            "layers": [n.range.start(), n.range.end()],
            "weight_bytes": n.weight_bytes,
            "up": status.is_some(),
            "epoch": status.as_ref().and_then(|s| s.epoch.map(|e| e.0)),
            "prepared_epochs": status.as_ref().map(|s| s.prepared_epochs.iter().map(|e| e.0).collect::<Vec<_>>()),
            "retiring_epochs": status.as_ref().map(|s| s.retiring_epochs.iter().map(|e| e.0).collect::<Vec<_>>()),
            "sessions": status.as_ref().map(|s| s.sessions),
            "slices": status.as_ref().map(|s| s.slices.iter().map(slice_json).collect::<Vec<_>>()),
            "memory": memory,
        }));
    }
    json!({"epoch": c.epoch.0, "nodes": nodes})
}

/// One slice a node holds, by model and epoch.
fn slice_json(x: &proto_types::SliceStatus) -> Value {
    let state = match x.state {
        proto_types::WireSliceState::Prepared => "prepared",
        proto_types::WireSliceState::Serving => "serving",
        proto_types::WireSliceState::Retiring => "retiring",
    };
    json!({"epoch": x.epoch.0, "model": x.model, "layers": [x.layers.start, x.layers.end],
           "state": state, "bytes": x.bytes})
}

/// A node gauge: its value from the node's status.
type Gauge = fn(&proto_types::NodeStatus) -> i64;

async fn metrics(State(st): State<Arc<AppState>>) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "# TYPE coordinator_requests_in_flight gauge\ncoordinator_requests_in_flight {}\n\
         # TYPE coordinator_plan_epoch gauge\ncoordinator_plan_epoch {}\n",
        st.admission_in_flight(),
        st.model(None)
            .ok()
            .and_then(|m| m.serving.epoch())
            .map_or(0, |e| e.0),
    );
    st.stats.encode(&mut out);
    if let Some(etcd) = &st.etcd {
        etcd.etcd_stats().encode("coordinator", &mut out);
    }
    // the nodes of the default model's plan (the models share the nodes)
    let Some(c) = st.model(None).ok().and_then(|m| m.serving.current().ok()) else {
        return out;
    };
    let all = statuses(&c).await;
    let gauges: [(&str, Gauge); 9] = [
        ("sessions", |s| s.sessions as i64),
        ("attributed_bytes", |s| s.attributed_bytes as i64),
        ("weights_bytes", |s| kind_sum(s, |l| l.weights) as i64),
        ("kv_cache_bytes", |s| kind_sum(s, |l| l.kv_cache) as i64),
        ("prefix_cache_bytes", |s| {
            kind_sum(s, |l| l.prefix_cache) as i64
        }),
        ("activation_bytes", |s| {
            kind_sum(s, |l| l.activations) as i64
        }),
        ("process_rss_bytes", |s| s.process_rss_bytes as i64),
        ("device_free_bytes", |s| s.device_free_bytes as i64),
        ("unattributed_bytes", |s| s.unattributed_bytes),
    ];
    let _ = writeln!(out, "# TYPE cluster_node_up gauge");
    for (n, s) in c.nodes.iter().zip(&all) {
        let _ = writeln!(
            out,
            "cluster_node_up{{node=\"{}\"}} {}",
            n.addr,
            s.is_some() as u8
        );
    }
    let _ = writeln!(out, "# TYPE cluster_node_slice_bytes gauge");
    for (n, s) in c.nodes.iter().zip(&all) {
        for x in s.iter().flat_map(|s| &s.slices) {
            let _ = writeln!(
                out,
                "cluster_node_slice_bytes{{node=\"{}\",model=\"{}\",epoch=\"{}\"}} {}",
                n.addr,
                x.model.replace(['"', '\\', '\n'], "_"),
                x.epoch.0,
                x.bytes
            );
        }
    }
    for (name, f) in gauges {
        let _ = writeln!(out, "# TYPE cluster_node_{name} gauge");
        for (n, s) in c.nodes.iter().zip(&all) {
            if let Some(s) = s {
                let _ = writeln!(out, "cluster_node_{name}{{node=\"{}\"}} {}", n.addr, f(s));
            }
        }
    }
    out
}

impl AppState {
    /// The models served now, the default first.
    pub fn models(&self) -> Vec<Arc<ServedModel>> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The model a request names (`None`: the default), or OpenAI's 404 `model_not_found`.
    fn model(&self, name: Option<&str>) -> Result<Arc<ServedModel>, ApiError> {
        let models = self.models();
        let found = match name {
            None => models.first(),
            Some(n) => models.iter().find(|m| m.id == n),
        };
        found.cloned().ok_or_else(|| {
            let served: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
            ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "The model `{}` does not exist; this server serves {}",
                    name.unwrap_or(""),
                    served.join(", ")
                ),
                "invalid_request_error",
            )
        })
    }

    /// Numbers a request and opens its root span.
    fn open_trace(&self, headers: &HeaderMap, chat: bool, model: &str) -> (String, RequestSpan) {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("{}-{n}", if chat { "chatcmpl" } else { "cmpl" });
        let trace = RequestSpan::open(headers, self.stats.clone(), chat, model, &id);
        (id, trace)
    }

    fn admission_in_flight(&self) -> usize {
        crate::MAX_IN_FLIGHT.saturating_sub(self.admission.available_permits())
    }
}

impl ServedModel {
    /// Checks that `g` compiles (the first call builds the compiler): off the async workers.
    async fn check_grammar(self: &Arc<Self>, g: &common::grammar::Grammar) -> Result<(), ApiError> {
        let (st, g) = (self.clone(), g.clone());
        tokio::task::spawn_blocking(move || {
            let c = st
                .grammar
                .get_or_init(|| {
                    common::grammar::GrammarCompiler::new(&st.tok, st.tok.eos())
                        .map(Arc::new)
                        .map_err(|e| e.to_string())
                })
                .clone()
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e, "server_error"))?;
            c.compile(&g).map(drop).map_err(|e| bad(e.to_string()))
        })
        .await
        .map_err(internal)?
    }
}

/// A 500 for a failure inside the coordinator (a blocking task that did not finish).
fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        e.to_string(),
        "server_error",
    )
}
