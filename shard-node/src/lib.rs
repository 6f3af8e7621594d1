//! The shard node: runs a slice of a model's layers for the coordinator.
//!
//! # Layout
//! - [`generate_cmd`]: `shard-node generate`, single-process generation over the same stage
//!   code the cluster runs.

pub mod generate_cmd;
