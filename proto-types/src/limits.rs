//! Protocol constants.

/// Checked in the handshake; a mismatch is refused.
pub const PROTOCOL_VERSION: u32 = 7;

/// Largest frame either side accepts (tarpc's length-delimited codec rejects bigger ones).
/// 64 MiB holds a 16k-token prefill chunk of 2048-wide f16 activations.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Rows of `width`-wide f32 activations that one frame carries, with an eighth of it left for
/// the rest of the request (ids, positions, sessions): a stage's pass, whose activations go
/// on to the next stage in one request, takes at most this many rows.
pub fn rows_per_frame(width: usize) -> usize {
    (MAX_FRAME_BYTES - MAX_FRAME_BYTES / 8) / (width.max(1) * std::mem::size_of::<f32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_holds_the_rows_of_a_pass() {
        // an 8B model's 4,096-wide rows: a whole GPU pass of 2,304 rows fits
        assert_eq!(rows_per_frame(4096), 3584);
        // a 70B model's 8,192-wide rows: 1,792, fewer than a GPU pass
        assert_eq!(rows_per_frame(8192), 1792);
        assert!(rows_per_frame(8192) * 8192 * 4 < MAX_FRAME_BYTES);
        assert!(rows_per_frame(0) > 0);
    }
}
