//! The shard node: runs a slice of a model's layers for the coordinator.
//!
//! # Layout
//! - [`serve_cmd`]: `shard-node serve`: runtime, signals, then [`server::serve`].
//! - [`server`]: `shard-node serve`, the tarpc server, its sessions and leases.
//! - [`generate_cmd`]: `shard-node generate`, single-process generation over the same stage
//!   code the cluster runs.
//! - [`synth_cmd`]: `shard-node synth-model`, synthetic llama GGUFs for benchmarks.
//! - [`leave_cmd`]: `shard-node leave`, drains a node out of its etcd cluster.
//! - [`membership`]: a node's etcd registration, 2PC recovery and drain.
//! - [`compare_cmd`]: `shard-node compare`, CPU against another device, step by step.
//! - [`bench_cmd`]: `shard-node bench`, prompt and decode speed for `scripts/bench-cpu.sh`.

pub mod bench_cmd;
pub mod compare_cmd;
pub mod generate_cmd;
pub mod leave_cmd;
pub mod membership;
pub mod serve_cmd;
pub mod server;
pub mod synth_cmd;
