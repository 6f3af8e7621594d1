//! [`Timeouts`]: the deadline of every call the coordinator makes to a shard node, in one
//! place.

use std::time::Duration;

/// How long each kind of call may take before the coordinator gives up on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect plus handshake.
    pub connect: Duration,
    /// `describe` (free memory, models).
    pub describe: Duration,
    /// A lease heartbeat; also `status` for `/v1/cluster` and `/metrics`.
    pub heartbeat: Duration,
    /// `status` for `coordinator status`.
    pub status: Duration,
    /// `open_session` on one stage.
    pub open_session: Duration,
    /// `close_session` on one stage.
    pub close_session: Duration,
    /// One step through the whole pipeline (a prefill chunk on a slow CPU included).
    pub step: Duration,
    /// Loading a slice, or PREPARE (reading and hashing a large model file included).
    pub load: Duration,
    /// COMMIT on one node.
    pub commit: Duration,
    /// ABORT on one node.
    pub abort: Duration,
}

/// The deadlines in use.
pub const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(5),
    describe: Duration::from_secs(10),
    heartbeat: Duration::from_secs(2),
    status: Duration::from_secs(5),
    open_session: Duration::from_secs(10),
    close_session: Duration::from_secs(5),
    step: Duration::from_secs(120),
    load: Duration::from_secs(600),
    commit: Duration::from_secs(30),
    abort: Duration::from_secs(10),
};
