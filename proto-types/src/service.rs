//! The shard-node tarpc service.

use crate::error::ShardError;
use crate::ids::{LeaseId, PlanEpoch, ReplyKey, SessionId};
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
    /// Opens a session as a copy of another (see [`ForkSession`]); the bytes the copy holds.
    async fn fork_session(req: ForkSession) -> Result<u64, ShardError>;
    /// Closes a session and frees its KV cache at once.
    async fn close_session(session: SessionId) -> Result<(), ShardError>;
    /// Runs the slice on each item, forwards to the next stage, and returns what the last
    /// stage sampled.
    async fn forward(req: ForwardRequest) -> Result<ForwardReply, ShardError>;
    /// On the last stage: the outcome of `session`'s step at `start` sent with
    /// [`ReplyRoute::Collect`] and `key`, once it is there (it may be asked for before the
    /// step arrives). Only the session's owner may collect it.
    async fn collect(
        session: SessionId,
        start: u32,
        key: ReplyKey,
    ) -> Result<ForwardOutput, ShardError>;
    /// Renews a lease.
    async fn heartbeat(lease: LeaseId) -> Result<LeaseStatus, ShardError>;
    /// Sessions, epoch and memory.
    async fn status() -> NodeStatus;
    /// Two-phase commit, PREPARE: loads the slice of a new epoch beside the served one, as
    /// a prepared buffer held by the caller's lease. `Ok` is a YES vote; an error (it does
    /// not fit the memory limit, the file is missing...) is a NO vote.
    async fn prepare_slice(req: LoadSlice) -> Result<SliceInfo, ShardError>;
    /// COMMIT: the prepared slice of `epoch` serves new sessions; sessions on older epochs
    /// finish on them, after which those slices are freed. Idempotent.
    async fn commit_slice(epoch: PlanEpoch) -> Result<(), ShardError>;
    /// ABORT: frees the prepared slice of `epoch`; the served one goes on. Idempotent.
    async fn abort_slice(epoch: PlanEpoch) -> Result<(), ShardError>;
}
