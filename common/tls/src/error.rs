//! The crate's error.

/// What can go wrong setting up or using TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
    /// The files do not make a usable configuration (the key does not match, no CA...).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// A certificate has no role, or one this build does not know.
    #[error("certificate role: {0}")]
    Role(String),
    /// Writing certificates failed.
    #[error("issuing certificates: {0}")]
    Issue(String),
    /// A connection's handshake failed or timed out.
    #[error("TLS handshake with {peer}: {detail}")]
    Handshake {
        /// The other end.
        peer: String,
        /// Why.
        detail: String,
    },
}

/// The crate's result.
pub type Result<T, E = TlsError> = std::result::Result<T, E>;
