//! The shard node: runs a slice of a model's layers for the coordinator.
//!
//! # Layout
//! - [`serve_cmd`]: `shard-node serve`: runtime, signals, then [`server::serve`].
//! - [`server`]: `shard-node serve`, the tarpc server, its sessions and leases.
//! - [`generate_cmd`]: `shard-node generate`, single-process generation over the same stage
//!   code the cluster runs.
//! - [`bench_cmd`]: `shard-node bench`, prompt and decode speed for `scripts/bench-cpu.sh`.

pub mod bench_cmd;
pub mod generate_cmd;
pub mod serve_cmd;
pub mod server;
