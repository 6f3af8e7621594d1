//! Identifier newtypes.

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($(#[$m:meta])* $name:ident($inner:ty)) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub $inner);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id!(
    /// One generation stream, the same id on every stage.
    SessionId(u64)
);
id!(
    /// The version of the shard plan a node serves.
    PlanEpoch(u64)
);
id!(
    /// A client's lease on a node: every buffer it creates belongs to it.
    LeaseId(u64)
);
id!(
    /// A session's secret for `collect`: random, made by the coordinator, sent only down the
    /// chain with the steps, so that a step another client slips in cannot answer it.
    ReplyKey(u64)
);

/// A half-open range of blocks `[start, end)` as it travels; checked on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WireLayerRange {
    /// First block.
    pub start: u32,
    /// One past the last block.
    pub end: u32,
}
