//! Connections to other shard nodes (next stages), one per address, shared by every session
//! and every batch that goes there.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use proto_types::{ErrorCode, ShardError, ShardNodeClient};

use super::state::lock;

/// Connects to `addr`, handshakes, and returns the client.
pub async fn connect(addr: &str) -> Result<ShardNodeClient, ShardError> {
    proto_types::connect(addr, "shard-node", Duration::from_secs(5))
        .await
        .map(|(c, _)| c)
        .map_err(|e| ShardError::new(ErrorCode::Downstream, format!("{addr}: {e}")))
}

/// Open clients by address. A client whose calls fail at the transport is forgotten, and the
/// next use connects afresh (the peer may have restarted).
#[derive(Debug, Default)]
pub struct PeerPool {
    clients: Mutex<HashMap<String, ShardNodeClient>>,
}

impl PeerPool {
    /// The client for `addr`, connecting if there is none.
    pub async fn get(&self, addr: &str) -> Result<ShardNodeClient, ShardError> {
        if let Some(c) = lock(&self.clients).get(addr) {
            return Ok(c.clone());
        }
        let c = connect(addr).await?;
        // Two racing connects keep the first; the other's connection closes when dropped.
        Ok(lock(&self.clients)
            .entry(addr.to_string())
            .or_insert(c)
            .clone())
    }

    /// Drops the client for `addr`.
    pub fn forget(&self, addr: &str) {
        lock(&self.clients).remove(addr);
    }
}
