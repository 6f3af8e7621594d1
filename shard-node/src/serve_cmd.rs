//! `shard-node serve`: builds the runtime, handles ctrl-c and SIGTERM, and serves.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::device::{init_threads, DeviceSpec};
use tokio_util::sync::CancellationToken;

use crate::server::compute::Compute;
use crate::server::{serve, Node, NodeConfig};

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
}

/// Serves until ctrl-c or SIGTERM.
pub fn run(o: ServeOptions) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if o.max_sessions == 0 {
        anyhow::bail!("--max-sessions must be at least 1");
    }
    init_threads(o.threads)?;
    let device = o.device.open()?;
    let cfg = NodeConfig {
        models_dir: o.models_dir,
        device: o.device,
        memory_limit: o.memory_limit,
        max_sessions: o.max_sessions,
        heartbeat_interval: Duration::from_secs(1),
        lease_ttl: Duration::from_secs(5),
    };
    let node = Arc::new(Node::new(cfg, device, Compute::start()?));
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
