//! The shard-node tarpc service.

use crate::error::ShardError;
use crate::ids::{LeaseId, PlanEpoch, SessionId};
use crate::messages::*;

/// What a shard node serves. Every call but `handshake` is made on a connection that has
/// handshaken; the connection's lease owns what its calls create.
#[tarpc::service]
pub trait ShardNode {
    /// Checks the protocol version and returns the connection's lease.
    async fn handshake(hello: Hello) -> Result<HelloAck, ShardError>;
    /// Device, memory and capabilities.
    async fn describe() -> NodeDescription;
    /// Loads a slice for an epoch (replacing the slice of an older epoch once unused).
    async fn load_slice(req: LoadSlice) -> Result<SliceInfo, ShardError>;
    /// Frees the slice of `epoch`.
    async fn unload_slice(epoch: PlanEpoch) -> Result<(), ShardError>;
    /// Opens a session on the current slice.
    async fn open_session(req: OpenSession) -> Result<(), ShardError>;
    /// Closes a session and frees its KV cache at once.
    async fn close_session(session: SessionId) -> Result<(), ShardError>;
    /// Runs the slice on each item, forwards to the next stage, and returns what the last
    /// stage sampled.
    async fn forward(req: ForwardRequest) -> Result<ForwardReply, ShardError>;
    /// Renews a lease.
    async fn heartbeat(lease: LeaseId) -> Result<LeaseStatus, ShardError>;
    /// Sessions, epoch and memory.
    async fn status() -> NodeStatus;
}
