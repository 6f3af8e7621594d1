//! Protocol constants.

/// Checked in the handshake; a mismatch is refused.
pub const PROTOCOL_VERSION: u32 = 7;

/// Largest frame either side accepts (tarpc's length-delimited codec rejects bigger ones).
/// 64 MiB holds a 16k-token prefill chunk of 2048-wide f16 activations.
pub const MAX_FRAME_BYTES: usize = 64 << 20;
