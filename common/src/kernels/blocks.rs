//! GGUF block layouts for the formats with fast CPU paths, and activation quantization.

use half::f16;

/// Elements per block, for every format here.
pub const BLOCK: usize = 32;

/// Weight formats with a fast CPU path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// 4-bit, scale only: `f16 d, u8 qs[16]` (18 bytes), value = d * (q - 8).
    Q4_0,
    /// 4-bit, scale and min: `f16 d, f16 m, u8 qs[16]` (20 bytes), value = d * q + m.
    Q4_1,
    /// 8-bit: `f16 d, i8 qs[32]` (34 bytes), value = d * q.
    Q8_0,
}

impl QuantKind {
    /// Bytes per block of 32 weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q8_0 => 34,
        }
    }

    /// The kind for a candle dtype, when there is a fast path for it.
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        match dtype {
            G::Q4_0 => Some(QuantKind::Q4_0),
            G::Q4_1 => Some(QuantKind::Q4_1),
            G::Q8_0 => Some(QuantKind::Q8_0),
            _ => None,
        }
    }
}

/// One block of 32 quantized activations: `x ≈ d * qs`, with `s = d * Σ qs` kept for
/// formats that carry a min (Q4_1). Scales are f16-exact values held as f32.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(16))]
pub struct ActBlock {
    /// Scale.
    pub d: f32,
    /// `d * Σ qs`.
    pub s: f32,
    /// Quantized values.
    pub qs: [i8; BLOCK],
}

impl Default for ActBlock {
    fn default() -> Self {
        ActBlock {
            d: 0.0,
            s: 0.0,
            qs: [0; BLOCK],
        }
    }
}

#[inline(always)]
pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Quantizes `x` (a multiple of 32 long) into `out`, one block per 32 values, rounding as
/// llama.cpp does (ties to even, scales stored through f16) so both engines see the same
/// integers.
pub fn quantize_acts(x: &[f32], out: &mut [ActBlock]) {
    debug_assert_eq!(x.len(), out.len() * BLOCK);
    for (chunk, blk) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in blk.qs.iter_mut().zip(chunk) {
            let r = (v * id).round_ties_even() as i32;
            *q = r.clamp(-127, 127) as i8;
            sum += i32::from(*q);
        }
        blk.d = f16::from_f32(d).to_f32();
        blk.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

/// Dequantizes one row of `k` weights of `kind` from its raw bytes (the reference for tests).
pub fn dequantize_row(kind: QuantKind, row: &[u8], out: &mut [f32]) {
    let bb = kind.block_bytes();
    for (b, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(b, 0);
        match kind {
            QuantKind::Q4_0 => {
                for j in 0..16 {
                    o[j] = d * (f32::from(b[2 + j] & 0xF) - 8.0);
                    o[j + 16] = d * (f32::from(b[2 + j] >> 4) - 8.0);
                }
            }
            QuantKind::Q4_1 => {
                let m = f16_at(b, 2);
                for j in 0..16 {
                    o[j] = d * f32::from(b[4 + j] & 0xF) + m;
                    o[j + 16] = d * f32::from(b[4 + j] >> 4) + m;
                }
            }
            QuantKind::Q8_0 => {
                for j in 0..BLOCK {
                    o[j] = d * f32::from(b[2 + j] as i8);
                }
            }
        }
    }
}
