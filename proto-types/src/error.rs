//! The error that crosses the wire: a stable code plus a human-readable detail. Internal
//! details stay in the node's log.

use serde::{Deserialize, Serialize};

/// What went wrong, as a stable code clients can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is malformed (bad shape, bad range, bad token...).
    InvalidArgument,
    /// The protocol version or the handshake does not match.
    VersionMismatch,
    /// No such session.
    UnknownSession,
    /// No such lease, or it expired.
    UnknownLease,
    /// The request's plan epoch is not the one this node serves.
    EpochMismatch,
    /// No slice is loaded for this epoch.
    NoSlice,
    /// The model file is missing or its sha256 differs.
    ModelUnavailable,
    /// Over a bound: memory, sessions, or context.
    ResourceExhausted,
    /// The next stage could not be reached or failed.
    Downstream,
    /// A bug or an unexpected failure on the node.
    Internal,
    /// The caller's certificate does not give it the role this call needs (only a
    /// coordinator may load, prepare, commit, abort or unload slices and open sessions).
    PermissionDenied,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {detail}")]
pub struct ShardError {
    /// The stable code.
    pub code: ErrorCode,
    /// What happened, for people.
    pub detail: String,
}

impl ShardError {
    /// An error with `code` and `detail`.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        ShardError {
            code,
            detail: detail.into(),
        }
    }
}
