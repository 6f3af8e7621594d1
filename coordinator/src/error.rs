//! The one error type of the coordinator library.

use proto_types::ShardError;

/// What can go wrong while planning or serving.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// From the model runtime: the model file, tokenizer or template.
    #[error(transparent)]
    Model(#[from] common::Error),
    /// From etcd: unreachable, a refused call, or a malformed record.
    #[error(transparent)]
    Registry(#[from] cluster_registry::RegistryError),
    /// A node could not be reached, or its connection broke.
    #[error("shard node {addr} is unavailable: {detail}")]
    NodeDown {
        /// The node.
        addr: String,
        /// What happened.
        detail: String,
    },
    /// A node answered with an error.
    #[error("shard node {addr}: {err}")]
    Shard {
        /// The node.
        addr: String,
        /// Its error.
        err: ShardError,
    },
    /// No plan fits the nodes.
    #[error("no plan fits: {0}")]
    Plan(String),
    /// The request is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// No plan is being served yet (an etcd cluster before its first commit).
    #[error("{0}")]
    NoPlan(String),
    /// Over the admission limit.
    #[error("{0}")]
    Busy(String),
    /// A configuration value is invalid.
    #[error("{0}")]
    Config(String),
    /// I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result alias of this crate.
pub type Result<T, E = CoordError> = std::result::Result<T, E>;
