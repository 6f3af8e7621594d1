//! `shard-node serve`: the tarpc server around the node's domain ([`crate::node`]).
//!
//! # Layout
//! - [`Server`]: the [`Node`] plus its compute thread, counters and peer connections.
//! - [`service`]: the `ShardNode` calls of one connection; the RPC edge, where
//!   [`crate::node::NodeError`] becomes the wire's `ShardError`.
//! - [`reaper`]: expired leases and idle sessions, then memory handed back.
//! - [`trim`]: giving freed heap memory back to the OS.
//! - [`trace`]: the spans of a node's work (passes, relays) in its requests' traces.
//! - [`compute`]: the thread forward passes run on.
//! - [`batch`]: continuous batching of session steps into one forward pass.
//! - [`relay`]: sends a batch's activations on to the next stage.
//! - [`peer`]: pooled client connections to next stages.
//! - [`metrics`]: counters, served as Prometheus text.
//! - [`wire`]: wire <-> domain conversions.

pub mod batch;
pub mod compute;
pub mod metrics;
pub mod peer;
pub mod reaper;
pub mod relay;
pub mod service;
pub mod trace;
pub mod trim;
pub mod wire;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use proto_types::{ShardNode, MAX_FRAME_BYTES};
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::node::{lock, Node};
use batch::Onward;
use compute::Compute;
use metrics::Metrics;
use peer::PeerPool;

/// A node with what serves it: the compute thread, its counters, and connections to next
/// stages.
#[derive(Debug)]
pub struct Server {
    /// What the node holds.
    pub node: Arc<Node>,
    /// The compute thread.
    pub compute: Compute,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Connections to next stages.
    pub peers: Arc<PeerPool>,
}

impl Server {
    /// Starts the compute thread; returns the server and the receiving end of the compute
    /// thread's onward traffic (to be run by [`relay::run`]).
    pub fn new(node: Arc<Node>) -> std::io::Result<(Self, mpsc::UnboundedReceiver<Onward>)> {
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let compute = Compute::start(tx, metrics.clone(), node.device.is_cpu(), node.cfg.poll)?;
        let server = Server {
            node,
            compute,
            metrics,
            peers: Arc::new(PeerPool::default()),
        };
        Ok((server, rx))
    }
}

/// Listens on `listen`, calls `on_bound` with the bound address, and serves until `shutdown`.
pub async fn serve(
    server: Arc<Server>,
    listen: SocketAddr,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let mut listener = tarpc::serde_transport::tcp::listen(listen, Bincode::default).await?;
    listener.config_mut().max_frame_length(MAX_FRAME_BYTES);
    on_bound(listener.local_addr());
    let tracker = TaskTracker::new();
    tracker.spawn(reaper::run(server.clone(), shutdown.clone()));
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
            server: server.clone(),
            lease: Arc::new(Mutex::new(None)),
        };
        let lease = conn.lease.clone();
        let node = server.node.clone();
        let token = shutdown.clone();
        tracker.spawn(async move {
            let requests = BaseChannel::with_defaults(transport)
                .execute(trace::Named(conn.serve()))
                .for_each(|f| async {
                    tokio::spawn(f);
                });
            tokio::select! {
                _ = requests => {}
                _ = token.cancelled() => {}
            }
            // The connection is gone: whatever its lease owns goes with it.
            if let Some(l) = *lock(&lease) {
                node.release_lease(l, &format!("connection from {peer} closed"));
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}
