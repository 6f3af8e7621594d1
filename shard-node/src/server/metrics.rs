//! Counters of the node's work, read by `--metrics-listen` as Prometheus text. The latency
//! histograms (each forward pass, each hop to the next stage) go through prometheus-client.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::node::{report, Node, SliceState};

/// The latency histograms.
#[derive(Debug)]
struct Latency {
    registry: Registry,
    pass: Histogram,
    hop: Histogram,
}

impl Default for Latency {
    fn default() -> Self {
        // 50 µs to about 0.8 s
        let pass = Histogram::new(exponential_buckets(0.00005, 2.0, 15));
        let hop = Histogram::new(exponential_buckets(0.00005, 2.0, 15));
        let mut registry = Registry::with_prefix("shard");
        registry.register(
            "forward_pass_seconds",
            "Time of one forward pass (a batch of steps) on this stage",
            pass.clone(),
        );
        registry.register(
            "hop_seconds",
            "A relay to the next stage less the time that stage spent on it: the wire both ways",
            hop.clone(),
        );
        Latency {
            registry,
            pass,
            hop,
        }
    }
}

/// Counters updated by the compute thread and the service.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Latency histograms.
    latency: Latency,
    /// Forward batches run.
    pub batches: AtomicU64,
    /// Items (session steps) in those batches.
    pub batch_items: AtomicU64,
    /// Token rows in those batches.
    pub batch_rows: AtomicU64,
    /// Items that failed.
    pub item_errors: AtomicU64,
    /// Nanoseconds the compute thread spent running forward batches.
    pub batch_nanos: AtomicU64,
    /// Connections closed on arrival: over `--max-connections`, or a failed TLS handshake.
    pub connections_refused: AtomicU64,
    /// Bytes of activations sent on to next stages (the tensors' data, without framing).
    pub activation_bytes: AtomicU64,
    /// Outcomes this (last) stage left for `collect` instead of sending back along the chain.
    pub direct_replies: AtomicU64,
    /// The etcd client, once the node has joined a cluster.
    pub etcd: std::sync::OnceLock<cluster_registry::Registry>,
}

impl Metrics {
    /// Counts one batch.
    pub fn batch(&self, items: usize, rows: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_items.fetch_add(items as u64, Ordering::Relaxed);
        self.batch_rows.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Adds one batch's running time.
    pub fn busy(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.batch_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.latency.pass.observe(took.as_secs_f64());
    }

    /// A relay of `bytes` of activations to the next stage took `round_trip`, of which that
    /// stage spent `there`.
    pub fn hop(&self, round_trip: Duration, there: Duration, bytes: usize) {
        self.activation_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.latency
            .hop
            .observe(round_trip.saturating_sub(there).as_secs_f64());
    }
}

fn line(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// The node's state and the server's counters in Prometheus' text format.
pub fn render(node: &Node, m: &Metrics) -> String {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let r = report(node);
    let mut out = String::new();
    let epoch = node.slice().map_or(0, |s| s.epoch.0);
    line(
        &mut out,
        "shard_plan_epoch",
        "gauge",
        "Plan epoch of the served slice (0: none).",
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
        node.leases.len() as u64,
    );
    line(
        &mut out,
        "shard_attributed_bytes",
        "gauge",
        "Bytes held by leases, all kinds.",
        r.attributed,
    );
    line(
        &mut out,
        "shard_device_total_bytes",
        "gauge",
        "Device total bytes (CPU: host memory).",
        r.device_total,
    );
    line(
        &mut out,
        "shard_device_free_bytes",
        "gauge",
        "Device free bytes (CPU: host available memory).",
        r.device_free,
    );
    line(
        &mut out,
        "shard_process_rss_bytes",
        "gauge",
        "Resident set of the node process.",
        r.rss,
    );
    line(
        &mut out,
        "shard_baseline_bytes",
        "gauge",
        "The runtime's own bytes at start-up.",
        r.baseline,
    );
    line(
        &mut out,
        "shard_step_scratch_bytes",
        "gauge",
        "Device scratch kept between steps while sessions exist: the CUDA decode graphs' buffers, freed once no session is left.",
        r.step_scratch,
    );
    if let Some(handles) = common::device::cuda_handles(&node.device) {
        line(
            &mut out,
            "shard_device_handles",
            "gauge",
            "Handles to the device: its clones, every buffer on it, candle's BLAS and RNG and workspaces (CUDA).",
            handles as u64,
        );
    }
    if !node.device.is_cpu() {
        let _ = writeln!(
            out,
            "# HELP shard_cuda_option Switches of our CUDA kernels (1: on).\n# TYPE shard_cuda_option gauge"
        );
        for (name, on) in common::cuda_options::get().named() {
            let _ = writeln!(out, "shard_cuda_option{{name=\"{name}\"}} {}", u8::from(on));
        }
    }
    if let Some(pool) = common::memory::pool_usage(&node.device) {
        line(
            &mut out,
            "shard_device_pool_reserved_bytes",
            "gauge",
            "Bytes the device's memory pool holds from the driver (CUDA).",
            pool.reserved,
        );
        line(
            &mut out,
            "shard_device_pool_used_bytes",
            "gauge",
            "Bytes of the device's memory pool that back live buffers (CUDA).",
            pool.used,
        );
    }
    let _ = writeln!(
        out,
        "# HELP shard_unattributed_bytes In use less attributed less baseline less step scratch.\n# TYPE shard_unattributed_bytes gauge\nshard_unattributed_bytes {}",
        r.unattributed
    );
    let _ = writeln!(
        out,
        "# HELP shard_lease_bytes Bytes held by one lease, by kind.\n# TYPE shard_lease_bytes gauge"
    );
    for h in &r.held {
        let lease = h
            .lease
            .map_or_else(|| "none".to_string(), |l| l.0.to_string());
        for (kind, v) in [
            ("weights", h.weights),
            ("prepared", h.prepared),
            ("kv_cache", h.kv_cache),
            ("activations", h.activations),
            ("prefix_cache", h.prefix_cache),
        ] {
            let _ = writeln!(
                out,
                "shard_lease_bytes{{lease=\"{lease}\",client=\"{}\",kind=\"{kind}\"}} {v}",
                h.client.replace(['"', '\\', '\n'], "_")
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP shard_slice_bytes Weight bytes of each slice held, by model, epoch and state.\n# TYPE shard_slice_bytes gauge"
    );
    for (epoch, model, _, state, bytes) in node.slices_held() {
        let state = match state {
            SliceState::Prepared(_) => "prepared",
            SliceState::Serving => "serving",
            SliceState::Retiring => "retiring",
        };
        let _ = writeln!(
            out,
            "shard_slice_bytes{{model=\"{}\",epoch=\"{}\",state=\"{state}\"}} {bytes}",
            model.replace(['"', '\\', '\n'], "_"),
            epoch.0
        );
    }
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
    let _ = writeln!(
        out,
        "# HELP shard_forward_seconds_total Time the compute thread spent running forward batches.\n# TYPE shard_forward_seconds_total counter\nshard_forward_seconds_total {}",
        get(&m.batch_nanos) as f64 / 1e9
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
        node.leases_released(),
    );
    line(
        &mut out,
        "shard_connections_refused_total",
        "counter",
        "Connections closed on arrival (over --max-connections, or a failed TLS handshake).",
        get(&m.connections_refused),
    );
    line(
        &mut out,
        "shard_activation_bytes_sent_total",
        "counter",
        "Bytes of activations sent on to next stages (tensor data, at --activations).",
        get(&m.activation_bytes),
    );
    line(
        &mut out,
        "shard_direct_replies_total",
        "counter",
        "Steps whose outcome this last stage left for the coordinator's collect call, one hop \
         away, instead of sending it back along the chain.",
        get(&m.direct_replies),
    );
    if let Some(etcd) = m.etcd.get() {
        etcd.etcd_stats().encode("shard", &mut out);
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &m.latency.registry).is_ok() {
        out.push_str(&text);
    }
    out
}
