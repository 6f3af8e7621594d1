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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cluster_tls::link::{Peer, Stream};
use cluster_tls::Acceptor;
use futures::StreamExt;
use proto_types::ShardNode;
use tarpc::server::{BaseChannel, Channel};
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
        let compute = Compute::start(
            tx,
            metrics.clone(),
            node.device.is_cpu(),
            node.cfg.poll,
            wire::activation_dtype(node.cfg.activations),
        )?;
        let server = Server {
            node,
            compute,
            metrics,
            peers: Arc::new(PeerPool::default()),
        };
        Ok((server, rx))
    }
}

/// What a node accepts: how (plain or TLS) and how much.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Plain TCP or mutual TLS.
    pub acceptor: Acceptor,
    /// Connections served at once; more are closed on arrival.
    pub max_connections: usize,
    /// Requests in flight on one connection; more wait for the first to finish.
    pub max_requests_per_connection: usize,
}

/// Listens on `listen`, calls `on_bound` with the bound address, and serves until `shutdown`.
pub async fn serve(
    server: Arc<Server>,
    listen: SocketAddr,
    admission: Admission,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    on_bound(listener.local_addr()?);
    let tracker = TaskTracker::new();
    tracker.spawn(reaper::run(server.clone(), shutdown.clone()));
    let slots = Arc::new(tokio::sync::Semaphore::new(admission.max_connections));
    let admission = Arc::new(admission);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            t = listener.accept() => match t {
                Ok(t) => t,
                Err(e) => {
                    // One bad connection never ends the accept loop.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // debug: a flood must not flood the log too; the counter shows it
            server
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, max = admission.max_connections, "too many connections; closed");
            continue;
        };
        // Replies and activations are small frames on a latency-critical path: no Nagle.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
        let (server, admission, token) = (server.clone(), admission.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _slot = slot;
            let peer = peer.to_string();
            let accepted = tokio::select! {
                a = admission.acceptor.accept(tcp, &peer) => a,
                _ = token.cancelled() => return,
            };
            match accepted {
                Ok((stream, who)) => {
                    connection(
                        server,
                        stream,
                        who,
                        &peer,
                        admission.max_requests_per_connection,
                        token,
                    )
                    .await
                }
                Err(e) => {
                    server
                        .metrics
                        .connections_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("refused: {e}");
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Serves one accepted connection until it closes or `shutdown`; then whatever its lease
/// owns goes with it.
async fn connection(
    server: Arc<Server>,
    stream: Stream,
    who: Peer,
    peer: &str,
    max_requests: usize,
    shutdown: CancellationToken,
) {
    let conn = service::Conn {
        server: server.clone(),
        peer: Arc::new(who),
        lease: Arc::new(Mutex::new(None)),
    };
    let lease = conn.lease.clone();
    let transport = proto_types::transport(stream).inspect(trace::note_request);
    let requests = BaseChannel::with_defaults(transport)
        .max_concurrent_requests(max_requests)
        .execute(trace::Named(conn.serve()))
        .for_each(|f| async {
            tokio::spawn(f);
        });
    tokio::select! {
        _ = requests => {}
        _ = shutdown.cancelled() => {}
    }
    let held = *lock(&lease);
    if let Some(l) = held {
        server
            .node
            .release_lease(l, &format!("connection from {peer} closed"));
    }
}
