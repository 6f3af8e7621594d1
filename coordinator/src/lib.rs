//! The coordinator: planner, generation driver and OpenAI-compatible HTTP API.
//!
//! # Layout
//! - [`plan`]: layers split across nodes by free memory.
//! - [`cluster`]: connections to the shard nodes, loading the plan, heartbeats.
//! - [`engine`]: one generation: sessions on every stage, prefill, decode, cleanup.
//! - [`http`]: the axum routes.
//! - [`serving`]: the plan new requests run on, replaced when a newer epoch commits.
//! - [`twopc`]: the two-phase commit of a new plan (PREPARE, decision in etcd, COMMIT/ABORT).
//! - [`driver`]: the etcd election of the one 2PC driver, and its membership watch.
//! - [`follow`]: every coordinator follows the committed plan in etcd.
//! - [`status_cmd`]: `coordinator status`, the cluster as a table.
//! - [`up`]: `coordinator up`, a local cluster in one command.
//! - [`error`]: the crate's error, [`CoordError`].

pub mod cluster;
pub mod driver;
pub mod engine;
pub mod error;
pub mod follow;
pub mod http;
pub mod plan;
pub mod serving;
pub mod status_cmd;
pub mod twopc;
pub mod up;

pub use error::{CoordError, Result};

/// Requests served at once; more get 429.
pub const MAX_IN_FLIGHT: usize = 64;
