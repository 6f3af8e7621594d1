//! The coordinator: planner, generation, OpenAI-compatible HTTP API and the 2PC driver.
//!
//! # Layout
//! - [`config`]: `serve`'s configuration, raw and checked.
//! - [`serve_cmd`]: `coordinator serve`: wiring, signals, the drain.
//! - [`plan`]: layers split across nodes by free memory.
//! - [`cluster`]: connections to the shard nodes, loading the plan, heartbeats.
//! - [`engine`]: one generation task: sessions on every stage, the decode loop over them
//!   (`RemoteChain`), cleanup.
//! - [`http`]: the axum routes.
//! - [`serving`]: the plan new requests run on, replaced when a newer epoch commits.
//! - [`twopc`]: the two-phase commit of a new plan (PREPARE, decision in etcd, COMMIT/ABORT).
//! - [`driver`]: the 2PC driver: the leader election in etcd, and the leader's membership
//!   watch that triggers re-plans.
//! - [`follow`]: every coordinator follows the committed plan in etcd.
//! - [`model_set`]: the models loaded at run time, followed in etcd (`models/`).
//! - [`timeouts`]: the deadline of every call to a node.
//! - [`status_cmd`]: `coordinator status`, the cluster as a table.
//! - [`up`]: `coordinator up`, a local cluster in one command.
//! - [`certs_cmd`]: `coordinator certs`, a CA and certificates for mutual TLS.
//! - [`error`]: the crate's error, [`CoordError`].

pub mod certs_cmd;
pub mod cluster;
pub mod config;
pub mod driver;
pub mod engine;
pub mod error;
pub mod follow;
pub mod http;
pub mod model_set;
pub mod models_cmd;
pub mod plan;
pub mod serve_cmd;
pub mod serving;
pub mod status_cmd;
pub mod timeouts;
pub mod twopc;
pub mod up;

pub use error::{CoordError, Result};

/// Requests served at once; more get 429.
pub const MAX_IN_FLIGHT: usize = 64;
