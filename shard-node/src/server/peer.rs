//! Connecting to another shard node (the next stage) as a client.

use std::time::Duration;

use proto_types::{
    ErrorCode, Hello, ShardError, ShardNodeClient, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use tarpc::tokio_serde::formats::Bincode;

/// Connects to `addr`, handshakes, and returns the client.
pub async fn connect(addr: &str) -> Result<ShardNodeClient, ShardError> {
    let down = |e: String| ShardError::new(ErrorCode::Downstream, format!("{addr}: {e}"));
    let mut transport = tarpc::serde_transport::tcp::connect(addr, Bincode::default);
    transport.config_mut().max_frame_length(MAX_FRAME_BYTES);
    let transport = tokio::time::timeout(Duration::from_secs(5), transport)
        .await
        .map_err(|_| down("connect timed out".into()))?
        .map_err(|e| down(e.to_string()))?;
    let client = ShardNodeClient::new(tarpc::client::Config::default(), transport).spawn();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        client: "shard-node".into(),
    };
    client
        .handshake(tarpc::context::current(), hello)
        .await
        .map_err(|e| down(e.to_string()))??;
    Ok(client)
}
