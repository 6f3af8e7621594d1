//! `shard-node serve`: the tarpc server.
//!
//! # Layout
//! - [`state`]: [`Node`], the slices and sessions, each owned by a lease.
//! - [`lease`]: the lease table, TTLs and activation charges.
//! - [`accounting`]: the memory report (per lease and kind; device; unattributed).
//! - [`trim`]: giving freed heap memory back to the OS.
//! - [`service`]: the `ShardNode` calls of one connection.
//! - [`compute`]: the thread forward passes run on.
//! - [`batch`]: continuous batching of session steps into one forward pass.
//! - [`relay`]: sends a batch's activations on to the next stage.
//! - [`peer`]: pooled client connections to next stages.
//! - [`metrics`]: counters, served as Prometheus text.
//! - [`wire`]: wire <-> domain conversions.

pub mod accounting;
pub mod batch;
pub mod compute;
pub mod lease;
pub mod metrics;
pub mod peer;
pub mod relay;
pub mod service;
pub mod state;
pub mod trim;
pub mod wire;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use proto_types::{ShardNode, MAX_FRAME_BYTES};
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use state::{Node, NodeConfig};

/// Listens on `listen`, calls `on_bound` with the bound address, and serves until `shutdown`.
pub async fn serve(
    node: Arc<Node>,
    listen: SocketAddr,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let mut listener = tarpc::serde_transport::tcp::listen(listen, Bincode::default).await?;
    listener.config_mut().max_frame_length(MAX_FRAME_BYTES);
    on_bound(listener.local_addr());
    let tracker = TaskTracker::new();
    // The reaper: expired leases, idle sessions, and handing freed memory back.
    let reaper = node.clone();
    let stop = shutdown.clone();
    let every = (node.cfg.lease_ttl / 4).min(std::time::Duration::from_millis(250));
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    let r = reaper.clone();
                    let _ = tokio::task::spawn_blocking(move || r.reap()).await;
                }
            }
        }
    });
    loop {
        let transport = tokio::select! {
            _ = shutdown.cancelled() => break,
            t = listener.next() => match t {
                Some(Ok(t)) => t,
                Some(Err(e)) => {
                    // One bad connection never ends the accept loop.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
                None => break,
            },
        };
        // Replies and activations are small frames on a latency-critical path: no Nagle.
        if let Err(e) = transport.get_ref().set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
        let peer = transport
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let conn = service::Conn {
            node: node.clone(),
            lease: Arc::new(Mutex::new(None)),
        };
        let lease = conn.lease.clone();
        let node = node.clone();
        let token = shutdown.clone();
        tracker.spawn(async move {
            let requests = BaseChannel::with_defaults(transport)
                .execute(conn.serve())
                .for_each(|f| async {
                    tokio::spawn(f);
                });
            tokio::select! {
                _ = requests => {}
                _ = token.cancelled() => {}
            }
            // The connection is gone: whatever its lease owns goes with it.
            if let Some(l) = *state::lock(&lease) {
                node.release_lease(l, &format!("connection from {peer} closed"));
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}
