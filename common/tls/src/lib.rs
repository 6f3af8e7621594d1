//! Mutual TLS on the cluster's tarpc links (coordinator → node, node → node).
//!
//! Every process holds the cluster CA, and a certificate and key of its own, signed by that
//! CA. A certificate's subject says its role (`OU=coordinator` or `OU=node`): a node reads
//! the caller's role from its certificate and lets only coordinators change what it holds.
//! A node's certificate also names the addresses it is dialed at, which callers check.
//!
//! # Layout
//! - [`files`]: the PEM files, loaded into rustls configurations ([`Identity`]).
//! - [`role`]: [`Role`], and reading it from a certificate.
//! - [`issue`]: a CA and signed certificates, for clusters without a PKI (`certs` commands).
//! - [`link`]: dialing ([`Dialer`]) and accepting ([`Acceptor`]) connections.
//! - [`args`]: the `--tls-*` flags both binaries take.

pub mod args;
pub mod error;
pub mod files;
pub mod issue;
pub mod link;
pub mod role;

pub use args::TlsArgs;
pub use error::{Result, TlsError};
pub use files::{client_trusting, http_server, Identity, TlsFiles};
pub use link::{Acceptor, Dialer};
pub use role::Role;
pub use tokio_rustls;
