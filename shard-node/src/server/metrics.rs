//! Counters of the node's work, read by `--metrics-listen` as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use super::state::Node;

/// Counters updated by the compute thread and the service.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Forward batches run.
    pub batches: AtomicU64,
    /// Items (session steps) in those batches.
    pub batch_items: AtomicU64,
    /// Token rows in those batches.
    pub batch_rows: AtomicU64,
    /// Items that failed.
    pub item_errors: AtomicU64,
    /// Leases released (connection closed or TTL expired).
    pub leases_released: AtomicU64,
}

impl Metrics {
    /// Counts one batch.
    pub fn batch(&self, items: usize, rows: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_items.fetch_add(items as u64, Ordering::Relaxed);
        self.batch_rows.fetch_add(rows as u64, Ordering::Relaxed);
    }
}

fn line(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// The node's state and counters in Prometheus' text format.
pub fn render(node: &Node) -> String {
    let m = &node.metrics;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let weights = node.slice().map_or(0, |s| s.stage.weight_bytes() as u64);
    let epoch = node.slice().map_or(0, |s| s.epoch.0);
    line(
        &mut out,
        "shard_plan_epoch",
        "gauge",
        "Plan epoch of the loaded slice (0: none).",
        epoch,
    );
    line(
        &mut out,
        "shard_sessions",
        "gauge",
        "Open sessions.",
        node.session_count() as u64,
    );
    line(
        &mut out,
        "shard_leases",
        "gauge",
        "Live leases.",
        node.lease_count() as u64,
    );
    line(
        &mut out,
        "shard_weight_bytes",
        "gauge",
        "Bytes of loaded weights.",
        weights,
    );
    line(
        &mut out,
        "shard_kv_cache_bytes",
        "gauge",
        "Bytes of KV caches.",
        node.kv_bytes(),
    );
    line(
        &mut out,
        "shard_used_bytes",
        "gauge",
        "Bytes the node accounts for.",
        node.used_bytes(),
    );
    line(
        &mut out,
        "shard_forward_batches_total",
        "counter",
        "Forward batches run.",
        get(&m.batches),
    );
    line(
        &mut out,
        "shard_forward_items_total",
        "counter",
        "Session steps run in batches.",
        get(&m.batch_items),
    );
    line(
        &mut out,
        "shard_forward_rows_total",
        "counter",
        "Token rows run in batches.",
        get(&m.batch_rows),
    );
    line(
        &mut out,
        "shard_forward_item_errors_total",
        "counter",
        "Session steps that failed.",
        get(&m.item_errors),
    );
    line(
        &mut out,
        "shard_leases_released_total",
        "counter",
        "Leases released.",
        get(&m.leases_released),
    );
    out
}
