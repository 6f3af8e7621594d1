//! `coordinator serve`: loads the model's tokenizer, connects the plan (static, or followed in
//! etcd with the leader driving re-plans), serves HTTP, and shuts down on ctrl-c or SIGTERM:
//! new connections stop, in-flight requests get [`ServeConfig::drain`] to finish, then every
//! task is stopped and awaited.

use std::future::IntoFuture;
use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use cluster_registry::{PlanKey, Registry};
use common::gguf::GgufFile;
use common::tokenizer::TextTokenizer;
use proto_types::PlanEpoch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{Cluster, ModelRef};
use crate::config::{Membership, ServeConfig};
use crate::driver::{self, DriverConfig};
use crate::error::Result;
use crate::follow;
use crate::http::admin::{Admin, Placement};
use crate::http::{auth, router, AppState, ServedModel};
use crate::model_set;
use crate::serving::Serving;
use crate::twopc::TwoPc;

/// Cancels `token` on ctrl-c or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::warn!("no SIGTERM handler: {e}");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
}

/// Serves until `shutdown` is cancelled, then drains.
pub async fn run(cfg: ServeConfig, shutdown: CancellationToken) -> Result<()> {
    crate::engine::prefix::set_budget(cfg.prefix_cache_bytes);
    crate::engine::set_replies(cfg.replies);
    let tasks = TaskTracker::new();
    let paths: Vec<&std::path::PathBuf> = std::iter::once(&cfg.model)
        .chain(&cfg.more_models)
        .collect();
    let mut models = Vec::with_capacity(paths.len());
    // Where the models loaded at run time are: beside the first.
    let models_dir = cfg
        .model
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let mut etcd = None;
    // Several models: each on a plan of its own over the same nodes (epochs 1, 2, ...), its
    // slices served beside the others'.
    for (i, path) in paths.iter().enumerate() {
        let file = GgufFile::open(path)?;
        let tok = Arc::new(TextTokenizer::from_gguf(&file)?);
        let max_ctx = cfg.max_ctx.min(file.config()?.context_length);
        let mut model = ModelRef::inspect(path)?;
        model.beside = paths.len() > 1 || cfg.admin_key.is_some();
        let model = Arc::new(model);
        let serving = Arc::new(Serving::default());
        match &cfg.membership {
            Membership::Static(nodes) => {
                let c = tokio::select! {
                    c = Cluster::start(nodes, model, max_ctx, PlanEpoch(i as u64 + 1)) => c?,
                    _ = shutdown.cancelled() => return Ok(()),
                };
                serving.replace(Arc::new(c));
            }
            Membership::Etcd {
                url,
                cluster,
                min_nodes,
                id,
                ttl_secs,
            } => {
                let registry = tokio::select! {
                    r = Registry::connect(url, cluster) => r?,
                    _ = shutdown.cancelled() => return Ok(()),
                };
                tasks.spawn(follow::run(
                    registry.clone(),
                    model.clone(),
                    serving.clone(),
                    shutdown.clone(),
                ));
                let driver = DriverConfig {
                    twopc: TwoPc {
                        registry: registry.clone(),
                        model,
                        key: PlanKey::Base,
                        max_ctx,
                        who: id.clone(),
                        failpoint: cfg.failpoint,
                    },
                    min_nodes: *min_nodes,
                    ttl_secs: *ttl_secs,
                    models_dir: models_dir.clone(),
                };
                etcd = Some((registry, id.clone()));
                tasks.spawn(driver::run(driver, serving.clone(), shutdown.clone()));
            }
        }
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string();
        models.push(Arc::new(ServedModel::new(id, serving, tok)));
    }
    let admin = match (&cfg.membership, &etcd) {
        (Membership::Static(nodes), _) => Some(Admin::fixed(
            nodes.clone(),
            models_dir.clone(),
            cfg.max_ctx,
            cfg.drain,
            models.len() as u64 + 1,
        )),
        (Membership::Etcd { .. }, Some((registry, who))) => Some(Admin {
            placement: Placement::Etcd {
                registry: Box::new(registry.clone()),
                who: who.clone(),
                failpoint: cfg.failpoint,
            },
            models_dir: models_dir.clone(),
            max_ctx: cfg.max_ctx,
            drain: cfg.drain,
        }),
        (Membership::Etcd { .. }, None) => None,
    };
    let state = Arc::new(AppState {
        models: std::sync::RwLock::new(models),
        admin,
        admission: Arc::new(tokio::sync::Semaphore::new(crate::MAX_IN_FLIGHT)),
        requests: AtomicU64::new(0),
        stats: Default::default(),
        changing: Default::default(),
        etcd: etcd.as_ref().map(|(r, _)| r.clone()),
    });
    if let Some((registry, _)) = etcd {
        // every coordinator serves the models loaded at run time that etcd holds
        tasks.spawn(model_set::follow(
            registry,
            state.clone(),
            models_dir,
            cfg.drain,
            shutdown.clone(),
        ));
    }
    let listener = tokio::net::TcpListener::bind(cfg.http).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }
    let app = router(
        state.clone(),
        auth::Keys::new(cfg.api_keys.clone()),
        auth::Keys::new(cfg.metrics_keys.clone()),
        cfg.admin_key.clone(),
    );
    match &cfg.http_tls {
        None => serve_http(listener, app, &shutdown, cfg.drain).await?,
        Some(tls) => {
            tracing::info!("the API is served over HTTPS");
            let listener = crate::http::tls::TlsListener::new(listener, tls.clone())?;
            serve_http(listener, app, &shutdown, cfg.drain).await?
        }
    }
    // No request runs any more: the leases on the nodes can go (the nodes free what they held).
    for m in &state.models() {
        m.serving.stop_heartbeats();
    }
    tasks.close();
    if tokio::time::timeout(cfg.drain, tasks.wait()).await.is_err() {
        tracing::warn!("background tasks still running at the drain deadline");
    }
    Ok(())
}

/// Serves `app` on `listener` until `shutdown`; in-flight requests then get `drain`.
async fn serve_http<L>(
    listener: L,
    app: axum::Router,
    shutdown: &CancellationToken,
    drain: std::time::Duration,
) -> Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let stopped = shutdown.clone();
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stopped.cancelled().await })
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        _ = shutdown.cancelled() => {
            // Graceful shutdown has begun: in-flight requests get the drain period.
            if tokio::time::timeout(drain, &mut server).await.is_err() {
                tracing::warn!(?drain, "requests still running at the drain deadline: ending them");
            }
        }
    }
    Ok(())
}
