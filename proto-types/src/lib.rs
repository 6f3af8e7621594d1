//! Wire types and the tarpc service of the shard-node protocol. Nothing here depends on
//! candle: these are plain data, converted to domain types at the edges.
//!
//! # Layout
//! - [`ids`]: newtypes that cross the wire (`SessionId`, `PlanEpoch`, `LeaseId`, `WireLayerRange`).
//! - [`tensor`]: [`WireTensor`], activations as f16/bf16/f32 bytes plus a shape, validated.
//! - [`messages`]: request and reply types of each call.
//! - [`error`]: [`ShardError`], a stable code plus a detail string.
//! - [`service`]: the [`ShardNode`] tarpc service.
//! - [`registry`]: the records a cluster keeps in etcd (nodes, plan, decisions, drains).
//! - [`limits`]: the protocol version, the frame size limit and the rows a frame carries.
//! - [`connect`]: the client side: TCP, frame limit, handshake.
//!
//! bincode encodes enum variants by position: only ever append variants, and bump
//! [`PROTOCOL_VERSION`] when a message changes.

pub mod codec;
pub mod connect;
pub mod error;
pub mod ids;
pub mod limits;
pub mod messages;
pub mod registry;
pub mod service;
pub mod tensor;

pub use connect::{connect, handshake, transport, ConnectError};
pub use error::{ErrorCode, ShardError};
pub use ids::{LeaseId, PlanEpoch, ReplyKey, SessionId, WireLayerRange};
pub use limits::{rows_per_frame, MAX_FRAME_BYTES, PROTOCOL_VERSION};
pub use messages::*;
pub use service::{ShardNode, ShardNodeClient};
pub use tensor::{WireDType, WireTensor};
