//! The client side of the transport: bincode over TCP with the frame limit, then the
//! handshake. Used by the coordinator and by each stage to reach the next.

use std::time::{Duration, Instant};

use tarpc::tokio_serde::formats::Bincode;

use crate::limits::{MAX_FRAME_BYTES, PROTOCOL_VERSION};
use crate::messages::{Hello, HelloAck};
use crate::service::ShardNodeClient;

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP failed or timed out, or the RPC itself failed.
    #[error("{0}")]
    Transport(String),
    /// The node refused the handshake.
    #[error(transparent)]
    Refused(#[from] crate::error::ShardError),
}

/// Connects to `addr` within `timeout`, handshakes as `client`, and returns the client with
/// the node's answer (the lease).
pub async fn connect(
    addr: &str,
    client: &str,
    timeout: Duration,
) -> Result<(ShardNodeClient, HelloAck), ConnectError> {
    let mut t = tarpc::serde_transport::tcp::connect(addr, Bincode::default);
    t.config_mut().max_frame_length(MAX_FRAME_BYTES);
    let t = tokio::time::timeout(timeout, t)
        .await
        .map_err(|_| ConnectError::Transport("connect timed out".into()))?
        .map_err(|e| ConnectError::Transport(e.to_string()))?;
    // Requests and activations are small frames on a latency-critical path: no Nagle.
    t.get_ref()
        .set_nodelay(true)
        .map_err(|e| ConnectError::Transport(format!("TCP_NODELAY: {e}")))?;
    let c = ShardNodeClient::new(tarpc::client::Config::default(), t).spawn();
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        client: client.to_string(),
    };
    let ack = c
        .handshake(ctx, hello)
        .await
        .map_err(|e| ConnectError::Transport(e.to_string()))??;
    Ok((c, ack))
}
