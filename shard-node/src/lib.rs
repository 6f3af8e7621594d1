//! The shard node: runs a slice of a model's layers for the coordinator.
//!
//! # Layout
//! - [`serve_cmd`]: `shard-node serve`: runtime, signals, then [`server::serve`].
//! - [`node`]: the node's domain, with no transport: slices and their 2PC states, sessions,
//!   connection leases, memory accounting. `Node::release_lease` is where a lease's memory is
//!   freed.
//! - [`server`]: the tarpc server around it: the RPC edge, the compute thread, batching, the
//!   relay to the next stage, metrics.
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
pub mod node;
pub mod serve_cmd;
pub mod server;
pub mod synth_cmd;
