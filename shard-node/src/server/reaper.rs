//! The reaper: releases expired leases and idle sessions, then hands freed memory back to the
//! OS and the device's driver for a while after each free.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Server;
use crate::node::now_ms;

/// How long after a free the reaper keeps handing memory back: what was removed may still be
/// in use for a moment (a batch in flight holds its sessions and slice), so it trims for a
/// while, not just once.
const TRIM_WINDOW: Duration = Duration::from_secs(2);

/// Runs until `stop`, every quarter lease TTL (at most 250 ms), off the async workers (a
/// device pool trim waits for the device).
pub async fn run(server: Arc<Server>, stop: CancellationToken) {
    let every = (server.node.cfg.lease_ttl / 4).min(Duration::from_millis(250));
    let mut tick = tokio::time::interval(every);
    let mut trim_until: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                let s = server.clone();
                match tokio::task::spawn_blocking(move || reap(&s, trim_until)).await {
                    Ok(until) => trim_until = until,
                    Err(e) => tracing::error!("the reaper failed: {e}"),
                }
            }
        }
    }
}

/// One round; returns until when trimming goes on.
fn reap(s: &Server, trim_until: Option<Instant>) -> Option<Instant> {
    let node = &s.node;
    node.expire(now_ms());
    let now = Instant::now();
    let mut until = trim_until;
    if node.take_freed() {
        until = Some(now + TRIM_WINDOW);
        if node.session_count() == 0 {
            // The compute thread's scratch buffers (head logits, products, decode graphs) are
            // kept between steps; with no session left they go too, before the trims below.
            s.compute
                .post(common::model::linear::release_thread_scratch);
        }
    }
    match until {
        Some(t) if now <= t => {
            if node.cfg.trim {
                super::trim::release_free_memory();
            }
            // Device buffers go back to the driver whatever --no-malloc-trim says: a cached
            // pool is exactly the leak this node exists to avoid.
            if let Some((before, after)) = common::memory::release_device_cache(&node.device) {
                if after.reserved < before.reserved {
                    tracing::info!(
                        released = before.reserved - after.reserved,
                        reserved = after.reserved,
                        used = after.used,
                        "device pool memory handed back to the driver"
                    );
                }
            }
            until
        }
        _ => None,
    }
}
