//! The transport: bincode in length-delimited frames, the frame limit checked before a
//! frame's buffer is allocated, over any byte stream (TCP, or TLS over TCP); and the client
//! side's handshake. Used by the coordinator and by each stage to reach the next.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tarpc::serde_transport::Transport;
use tarpc::tokio_util::codec::LengthDelimitedCodec;

use crate::codec::SafeBincode;
use tokio::io::{AsyncRead, AsyncWrite};

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

/// The framed bincode transport over `io`; a frame longer than [`MAX_FRAME_BYTES`] is refused
/// from its length prefix, before any buffer for it is allocated, and a frame whose decoding
/// panics is an error (see [`crate::codec`]).
pub fn transport<S, In, Out>(io: S) -> Transport<S, In, Out, SafeBincode<In, Out>>
where
    S: AsyncRead + AsyncWrite,
    In: for<'de> Deserialize<'de>,
    Out: Serialize,
{
    let framed = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_framed(io);
    tarpc::serde_transport::new(framed, SafeBincode::default())
}

/// Starts a client over `io` (a connected stream) and handshakes as `client` within
/// `timeout`.
pub async fn handshake<S>(
    io: S,
    client: &str,
    timeout: Duration,
) -> Result<(ShardNodeClient, HelloAck), ConnectError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let c = ShardNodeClient::new(tarpc::client::Config::default(), transport(io)).spawn();
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

/// Connects to `addr` over plain TCP within `timeout`, handshakes as `client`, and returns the client with
/// the node's answer (the lease).
pub async fn connect(
    addr: &str,
    client: &str,
    timeout: Duration,
) -> Result<(ShardNodeClient, HelloAck), ConnectError> {
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Transport("connect timed out".into()))?
        .map_err(|e| ConnectError::Transport(e.to_string()))?;
    // Requests and activations are small frames on a latency-critical path: no Nagle.
    tcp.set_nodelay(true)
        .map_err(|e| ConnectError::Transport(format!("TCP_NODELAY: {e}")))?;
    handshake(tcp, client, timeout).await
}
