//! [`RegistryError`]: what can go wrong talking to etcd.

/// An etcd call failed, or what it read or would write is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// etcd could not be reached, or refused a call.
    #[error("etcd: {}", brief(.0))]
    Etcd(#[source] Box<etcd_client::Error>),
    /// No listed member answered when connecting.
    #[error(
        "no etcd member answered at {urls}: {}. Is etcd running there, and does --etcd name \
         its client URLs (http://HOST:2379, several comma-separated)?",
        brief(.source)
    )]
    Unreachable {
        /// The endpoints tried.
        urls: String,
        /// The last failure.
        #[source]
        source: Box<etcd_client::Error>,
    },
    /// A record in etcd is malformed or does not fit (it is ignored, never half-applied).
    #[error("etcd record {key}: {reason}")]
    BadRecord {
        /// Its key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Another holder owns what was asked for (a node id already registered, a decision
    /// already written).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A name or record this side would write is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The etcd member in use changed during a call that waits (the election's campaign).
    #[error("the etcd member in use changed during the campaign; campaigning again")]
    MemberChanged,
    /// A record could not be encoded.
    #[error("encoding a record: {0}")]
    Encode(#[from] serde_json::Error),
}

impl From<etcd_client::Error> for RegistryError {
    fn from(e: etcd_client::Error) -> Self {
        RegistryError::Etcd(Box::new(e))
    }
}

/// An etcd error in one line: a gRPC status as its message and code, without the empty
/// details and metadata its own text prints.
pub(crate) fn brief(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{} ({:?})", s.message(), s.code()),
        other => other.to_string(),
    }
}

/// Result alias of this crate.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
