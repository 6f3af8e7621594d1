//! [`NodeError`]: why the node refused a change to what it holds. Converted to the wire's
//! `ShardError` only at the RPC edge (`server::wire`).

use proto_types::{LeaseId, PlanEpoch, SessionId};

/// A refused operation on the node's slices, sessions or leases.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// A configuration value is out of bounds.
    #[error("{0}")]
    Config(String),
    /// The lease is not in the table (never granted, released, or expired).
    #[error("lease {0} is unknown or expired")]
    UnknownLease(LeaseId),
    /// The node has left its cluster and takes nothing new.
    #[error("this node has left its cluster")]
    Left,
    /// A slice of this epoch is held already.
    #[error("epoch {0} already has a slice here")]
    EpochTaken(PlanEpoch),
    /// A different slice (model or layers) of this epoch is held already.
    #[error("epoch {epoch} already has a slice of {model} blocks {layers} here")]
    OtherSlice {
        /// The epoch.
        epoch: PlanEpoch,
        /// The held slice's model.
        model: String,
        /// The held slice's layers.
        layers: String,
    },
    /// PREPARE of an epoch not newer than the served one.
    #[error("epoch {epoch} is not newer than the served {served}")]
    NotNewer {
        /// The prepared epoch.
        epoch: PlanEpoch,
        /// The served epoch.
        served: PlanEpoch,
    },
    /// COMMIT of an epoch older than the served one.
    #[error("epoch {epoch} is behind the served {served}")]
    Behind {
        /// The epoch to commit.
        epoch: PlanEpoch,
        /// The served epoch.
        served: PlanEpoch,
    },
    /// COMMIT of an epoch with no prepared slice.
    #[error("no slice is prepared for epoch {0}")]
    NotPrepared(PlanEpoch),
    /// COMMIT of an epoch that was committed and then replaced.
    #[error("epoch {0} was replaced by a newer one")]
    Replaced(PlanEpoch),
    /// ABORT of a committed epoch.
    #[error("epoch {0} is committed here; it cannot be aborted")]
    Committed(PlanEpoch),
    /// No slice of this epoch at all.
    #[error("no slice of epoch {0}")]
    NoSuchEpoch(PlanEpoch),
    /// A session or step names an epoch other than the served one.
    #[error("this node serves epoch {served}, not {epoch}")]
    ServesOther {
        /// The epoch asked for.
        epoch: PlanEpoch,
        /// The served epoch.
        served: PlanEpoch,
    },
    /// Nothing is committed for this epoch (and nothing is served).
    #[error("no slice is committed for epoch {0}")]
    NotCommitted(PlanEpoch),
    /// A slice would not fit beside what is held.
    #[error(
        "the slice of epoch {epoch} needs {bytes} bytes beside the {held} held; the limit is {limit}"
    )]
    SliceDoesNotFit {
        /// The slice's epoch.
        epoch: PlanEpoch,
        /// Its weight bytes.
        bytes: u64,
        /// Bytes reserved already.
        held: u64,
        /// `--memory-limit`.
        limit: u64,
    },
    /// A session's KV cache would not fit beside what is held.
    #[error(
        "a session of {kv_bytes} KV bytes does not fit: {reserved} of {limit} bytes are reserved"
    )]
    SessionDoesNotFit {
        /// The session's most KV bytes.
        kv_bytes: u64,
        /// Bytes reserved already.
        reserved: u64,
        /// `--memory-limit`.
        limit: u64,
    },
    /// The session bound is reached.
    #[error("{0} sessions are open, the limit")]
    TooManySessions(usize),
    /// A session of this id is open already.
    #[error("session {0} is already open")]
    SessionOpen(SessionId),
    /// No such session (or not under this lease).
    #[error("session {id} is not open{}", why_closed(.owner, *.left))]
    UnknownSession {
        /// The session.
        id: SessionId,
        /// The lease it was asked under, when its owner is what did not match.
        owner: Option<LeaseId>,
        /// Whether the node has left its cluster (its sessions ended at the drain deadline).
        left: bool,
    },
}

fn why_closed(owner: &Option<LeaseId>, left: bool) -> String {
    match owner {
        Some(l) => format!(" under lease {l}"),
        None if left => {
            " (this node has left its cluster; its sessions were ended at the drain deadline)"
                .into()
        }
        None => String::new(),
    }
}

/// The node's result type.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;
