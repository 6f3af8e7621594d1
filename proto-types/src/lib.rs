//! Wire types and tarpc service traits of the shard-node protocol.
//!
//! Arrives with issue 3; this crate is a placeholder in the workspace layout.
