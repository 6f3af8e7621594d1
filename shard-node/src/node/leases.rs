//! The lease table: who owns what on this node.
//!
//! A *connection lease* ([`LeaseId`]) is granted to every client connection in its handshake. Every buffer it creates (a slice's
//! weights, a session's KV cache, activations in flight) is registered with that lease, and
//! goes when the lease goes: on an explicit close, when the connection closes, or when no
//! heartbeat came within the TTL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto_types::LeaseId;

use super::error::{NodeError, Result};
use super::lock;

#[derive(Debug)]
struct Lease {
    client: String,
    renewed: Instant,
    activations: Arc<AtomicU64>,
}

/// Live leases.
#[derive(Debug)]
pub struct Leases {
    map: Mutex<HashMap<LeaseId, Lease>>,
    next: AtomicU64,
    ttl: Duration,
}

/// Bytes of activations held for a lease while a step is queued, computed or relayed; given
/// back when dropped.
#[derive(Debug)]
pub struct Charge {
    counter: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Leases {
    /// An empty table whose leases live `ttl` past their last renewal.
    pub fn new(ttl: Duration) -> Self {
        Leases {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            ttl,
        }
    }

    /// The TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new lease for `client`.
    pub fn grant(&self, client: String) -> LeaseId {
        let id = LeaseId(self.next.fetch_add(1, Ordering::Relaxed));
        let lease = Lease {
            client,
            renewed: Instant::now(),
            activations: Arc::default(),
        };
        lock(&self.map).insert(id, lease);
        id
    }

    /// Renews `lease`; returns the TTL.
    pub fn renew(&self, lease: LeaseId) -> Result<Duration> {
        let mut map = lock(&self.map);
        let l = map.get_mut(&lease).ok_or(NodeError::UnknownLease(lease))?;
        l.renewed = Instant::now();
        Ok(self.ttl)
    }

    /// Checks that `lease` is live.
    pub fn check(&self, lease: LeaseId) -> Result<()> {
        lock(&self.map)
            .contains_key(&lease)
            .then_some(())
            .ok_or(NodeError::UnknownLease(lease))
    }

    /// Removes `lease`; returns its client's name if it was live.
    pub fn remove(&self, lease: LeaseId) -> Option<String> {
        lock(&self.map).remove(&lease).map(|l| l.client)
    }

    /// Leases not renewed within the TTL.
    pub fn expired(&self) -> Vec<LeaseId> {
        let now = Instant::now();
        lock(&self.map)
            .iter()
            .filter(|(_, l)| now.duration_since(l.renewed) > self.ttl)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Charges `bytes` of activations to `lease`.
    pub fn charge(&self, lease: LeaseId, bytes: u64) -> Result<Charge> {
        let map = lock(&self.map);
        let l = map.get(&lease).ok_or(NodeError::UnknownLease(lease))?;
        l.activations.fetch_add(bytes, Ordering::Relaxed);
        Ok(Charge {
            counter: l.activations.clone(),
            bytes,
        })
    }

    /// Every live lease: id, client, activation bytes.
    pub fn list(&self) -> Vec<(LeaseId, String, u64)> {
        let mut v: Vec<_> = lock(&self.map)
            .iter()
            .map(|(&id, l)| (id, l.client.clone(), l.activations.load(Ordering::Relaxed)))
            .collect();
        v.sort();
        v
    }

    /// Live leases.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_expire_and_charges_come_back() {
        let t = Leases::new(Duration::from_millis(30));
        let a = t.grant("a".into());
        let c = t.charge(a, 100).expect("live");
        assert_eq!(t.list()[0].2, 100);
        drop(c);
        assert_eq!(t.list()[0].2, 0);
        assert!(t.expired().is_empty());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(t.expired(), vec![a]);
        t.renew(a).expect("still in the table until removed");
        assert!(t.expired().is_empty());
        assert_eq!(t.remove(a).as_deref(), Some("a"));
        assert_eq!(t.renew(a), Err(NodeError::UnknownLease(a)));
        assert!(t.charge(a, 1).is_err());
    }
}
