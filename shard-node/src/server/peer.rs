//! Connecting to another shard node (the next stage) as a client.

use std::time::Duration;

use proto_types::{ErrorCode, ShardError, ShardNodeClient};

/// Connects to `addr`, handshakes, and returns the client.
pub async fn connect(addr: &str) -> Result<ShardNodeClient, ShardError> {
    proto_types::connect(addr, "shard-node", Duration::from_secs(5))
        .await
        .map(|(c, _)| c)
        .map_err(|e| ShardError::new(ErrorCode::Downstream, format!("{addr}: {e}")))
}
