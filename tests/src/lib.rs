//! Helpers shared by the cross-process and model tests: real processes on port 0 that are
//! killed on drop, and clients to talk to them.
//!
//! # Layout
//! - [`process`]: `shard-node serve` and `coordinator serve` processes, the binaries' paths.
//! - [`compose`]: Docker Compose projects of the cluster's images (several hosts).
//! - [`etcd`]: a real etcd server, or a cluster of several members.
//! - [`http`]: HTTP requests, OpenAI SSE streams, streams running in the background.
//! - [`otlp`]: a real OTLP trace receiver.
//! - [`rpc`]: a node's status and leases over tarpc.
//! - [`model`]: the default model's folder, and single-process `shard-node generate`, the
//!   reference output.

pub mod compose;
pub mod etcd;
pub mod http;
pub mod model;
pub mod otlp;
pub mod process;
pub mod reference;
pub mod rpc;
pub mod tls;

pub use common::testing::{default_model, gemma3_model, workspace_root};
pub use etcd::{EtcdCluster, EtcdProcess, EtcdTlsFiles};
pub use http::{
    all_at_once, call_with, completion, completion_with, get, get_json, metric, post, post_with,
    sse_text, BackgroundStream,
};
pub use model::{generate, models_dir};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use process::{
    coordinator_bin, free_port, rss_kib, shard_node_bin, shard_node_leave, CoordinatorProcess,
    ShardProcess,
};
pub use rpc::{connect, keep_alive, kv_bytes, last_stage_session, node_status, wait_status};
pub use tls::{https_request, ClusterCerts};
