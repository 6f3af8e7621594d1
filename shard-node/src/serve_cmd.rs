//! `shard-node serve`: builds the runtime, handles ctrl-c and SIGTERM, and serves.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::device::{init_threads, DeviceSpec};
use tokio_util::sync::CancellationToken;

use crate::server::{metrics, relay, serve, Node, NodeConfig};

/// Options of `serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Listen address.
    pub listen: SocketAddr,
    /// Device.
    pub device: DeviceSpec,
    /// Models directory.
    pub models_dir: PathBuf,
    /// Memory limit in bytes.
    pub memory_limit: Option<u64>,
    /// Session bound.
    pub max_sessions: usize,
    /// Kernel threads.
    pub threads: Option<usize>,
    /// Prometheus metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// Stop when this process is no longer the parent.
    pub parent_pid: Option<u32>,
    /// Advertised heartbeat interval.
    pub heartbeat: Duration,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Idle session timeout.
    pub session_idle: Duration,
    /// `malloc_trim` after frees.
    pub trim: bool,
}

/// Serves until ctrl-c or SIGTERM.
pub fn run(o: ServeOptions) -> anyhow::Result<()> {
    if o.trim {
        crate::server::trim::configure_allocator();
    }
    common::telemetry::init_logging();
    init_threads(o.threads)?;
    let device = o.device.open()?;
    let cfg = NodeConfig {
        models_dir: o.models_dir,
        device: o.device,
        memory_limit: o.memory_limit,
        max_sessions: o.max_sessions,
        heartbeat_interval: o.heartbeat,
        lease_ttl: o.lease_ttl,
        session_idle: o.session_idle,
        trim: o.trim,
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    let (node, onward) = Node::new(cfg, device)?;
    let node = Arc::new(node);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("no SIGTERM handler: {e}");
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            signals.cancel();
        });
        tokio::spawn(relay::run(onward, node.peers.clone()));
        if let Some(pid) = o.parent_pid {
            let orphaned = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    if std::os::unix::process::parent_id() != pid {
                        orphaned.cancel();
                        tracing::warn!("parent {pid} is gone; shutting down");
                        break;
                    }
                }
            });
        }
        if let Some(addr) = o.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let bound = listener.local_addr()?;
            tracing::info!(addr = %bound, "metrics listening");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "metrics on {bound}");
            let _ = out.flush();
            let n = node.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let n = n.clone();
                    async move { metrics::render(&n) }
                }),
            );
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::warn!("metrics server: {e}");
                }
            });
        }
        serve(node, o.listen, shutdown, |addr| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {addr}");
            let _ = out.flush();
            tracing::info!(%addr, "listening");
        })
        .await
    })?;
    Ok(())
}
