//! Connections to other shard nodes (next stages), one per address, shared by every session
//! and every batch that goes there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto_types::{ErrorCode, LeaseId, ShardError, ShardNodeClient};

use crate::node::lock;

/// Open clients by address, each renewing its lease on the peer while it is pooled. A client
/// whose calls fail at the transport is forgotten, and the next use connects afresh (the peer
/// may have restarted).
#[derive(Debug, Default)]
pub struct PeerPool {
    clients: Arc<Mutex<HashMap<String, (ShardNodeClient, LeaseId)>>>,
}

impl PeerPool {
    /// The client for `addr`, connecting if there is none.
    pub async fn get(&self, addr: &str) -> Result<ShardNodeClient, ShardError> {
        if let Some((c, _)) = lock(&self.clients).get(addr) {
            return Ok(c.clone());
        }
        let (c, ack) = cluster_tls::Dialer::global()
            .connect(addr, "shard-node", Duration::from_secs(5))
            .await
            .map_err(|e| ShardError::new(ErrorCode::Downstream, format!("{addr}: {e}")))?;
        // Two racing connects keep the first; the other's connection closes when dropped.
        let (client, lease) = lock(&self.clients)
            .entry(addr.to_string())
            .or_insert((c, ack.lease))
            .clone();
        if lease == ack.lease {
            let every = Duration::from_millis(ack.heartbeat_interval_ms.max(10));
            tokio::spawn(heartbeat(
                self.clients.clone(),
                addr.to_string(),
                lease,
                every,
            ));
        }
        Ok(client)
    }

    /// Drops the client for `addr`.
    pub fn forget(&self, addr: &str) {
        lock(&self.clients).remove(addr);
    }
}

/// Renews `lease` on `addr` while the pool still holds that client.
async fn heartbeat(
    clients: Arc<Mutex<HashMap<String, (ShardNodeClient, LeaseId)>>>,
    addr: String,
    lease: LeaseId,
    every: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let client = match lock(&clients).get(&addr) {
            Some((c, l)) if *l == lease => c.clone(),
            _ => return,
        };
        let mut ctx = common::telemetry::untraced(tarpc::context::current());
        ctx.deadline = std::time::Instant::now() + every * 2;
        let beat = common::telemetry::unrecorded(client.heartbeat(ctx, lease)).await;
        if !matches!(beat, Ok(Ok(_))) {
            let mut map = lock(&clients);
            if map.get(&addr).is_some_and(|(_, l)| *l == lease) {
                map.remove(&addr);
            }
            return;
        }
    }
}
