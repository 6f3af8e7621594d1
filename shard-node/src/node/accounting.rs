//! The node's memory report: what each lease holds, and what the device or process has in
//! use as seen from outside the node's bookkeeping.

use super::{Held, Node};

/// One snapshot.
#[derive(Debug, Clone)]
pub struct Report {
    /// Per lease, by kind.
    pub held: Vec<Held>,
    /// Sum of `held`.
    pub attributed: u64,
    /// Device total bytes.
    pub device_total: u64,
    /// Device free bytes.
    pub device_free: u64,
    /// Resident set of the process.
    pub rss: u64,
    /// The runtime's own bytes at start-up.
    pub baseline: u64,
    /// Device scratch kept between steps while sessions exist (CUDA decode graphs' buffers).
    pub step_scratch: u64,
    /// In use less attributed less baseline less step scratch.
    pub unattributed: i64,
}

/// Takes a snapshot.
pub fn report(node: &Node) -> Report {
    let held = node.held();
    let attributed: u64 = held.iter().map(Held::total).sum();
    let (device_free, device_total) = common::memory::device_memory(&node.device).unwrap_or((0, 0));
    let in_use = common::memory::in_use(&node.device);
    let step_scratch = common::memory::step_scratch_bytes();
    Report {
        held,
        attributed,
        device_total,
        device_free,
        rss: common::memory::process_rss().unwrap_or(0),
        baseline: node.baseline(),
        step_scratch,
        unattributed: in_use as i64
            - attributed as i64
            - node.baseline() as i64
            - step_scratch as i64,
    }
}
