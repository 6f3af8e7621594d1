//! The coordinator: planner, generation driver and OpenAI-compatible HTTP API.
//!
//! # Layout
//! - [`plan`]: layers split across nodes by free memory.
//! - [`cluster`]: connections to the shard nodes, loading the plan, heartbeats.
//! - [`engine`]: one generation: sessions on every stage, prefill, decode, cleanup.
//! - [`http`]: the axum routes.
//! - [`up`]: `coordinator up`, a local cluster in one command.
//! - [`error`]: the crate's error, [`CoordError`].

pub mod cluster;
pub mod engine;
pub mod error;
pub mod http;
pub mod plan;
pub mod up;

pub use error::{CoordError, Result};

/// Requests served at once; more get 429.
pub const MAX_IN_FLIGHT: usize = 64;
