//! GGUF block layouts for the formats with fast CPU paths, and activation quantization.
#![allow(unsafe_code)]

use half::f16;

use super::kquants::QK_K;

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
    /// 5-bit, scale only: `f16 d, u8 qh[4], u8 qs[16]` (22 bytes), value = d * (q - 16), bit
    /// `j` of the little-endian `qh` being bit 4 of value `j`.
    Q5_0,
    /// 5-bit, scale and min: `f16 d, f16 m, u8 qh[4], u8 qs[16]` (24 bytes), value = d * q + m.
    Q5_1,
    /// 4-bit K-quant, super-blocks of 256 in eight sub-blocks of 32 with 6-bit scales and mins:
    /// `f16 d, f16 dmin, u8 scales[12], u8 qs[128]` (144 bytes), value = d·sc·q − dmin·m.
    Q4K,
    /// 5-bit K-quant: Q4_K's layout with `u8 qh[32]` before `qs` (176 bytes).
    Q5K,
    /// 6-bit K-quant, sixteen sub-blocks of 16 with 8-bit scales:
    /// `u8 ql[128], u8 qh[64], i8 scales[16], f16 d` (210 bytes), value = d·sc·(q − 32).
    Q6K,
}

impl QuantKind {
    /// Bytes per block of [`QuantKind::block_elems`] weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q8_0 => 34,
            QuantKind::Q5_0 => 22,
            QuantKind::Q5_1 => 24,
            QuantKind::Q4K => 144,
            QuantKind::Q5K => 176,
            QuantKind::Q6K => 210,
        }
    }

    /// Weights per block: [`BLOCK`], or [`QK_K`] for the K-quants (whose activations are
    /// quantized to Q8_K blocks of as many, see [`super::kquants`]).
    pub const fn block_elems(self) -> usize {
        match self {
            QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q8_0 => BLOCK,
            QuantKind::Q5_0 | QuantKind::Q5_1 => BLOCK,
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => QK_K,
        }
    }

    /// The kind for a candle dtype, when there is a fast path for it.
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        match dtype {
            G::Q4_0 => Some(QuantKind::Q4_0),
            G::Q4_1 => Some(QuantKind::Q4_1),
            G::Q8_0 => Some(QuantKind::Q8_0),
            G::Q5_0 => Some(QuantKind::Q5_0),
            G::Q5_1 => Some(QuantKind::Q5_1),
            G::Q4K => Some(QuantKind::Q4K),
            G::Q5K => Some(QuantKind::Q5K),
            G::Q6K => Some(QuantKind::Q6K),
            _ => None,
        }
    }
}

/// A format of quantized activations: a token's row is cut into blocks of [`Acts::ELEMS`]
/// values, quantized once per product and dotted with every weight row.
pub trait Acts: Copy + Default + Send + Sync + 'static {
    /// Values per block.
    const ELEMS: usize;
    /// Quantizes `x` (a multiple of [`Acts::ELEMS`] long) into `out`, one block per
    /// [`Acts::ELEMS`] values, exactly as llama.cpp does for the weight formats using it.
    fn quantize(x: &[f32], out: &mut [Self]);
}

/// One block of 32 quantized activations: `x ≈ d * qs`, with `s = d * Σ qs` kept for
/// formats that carry a min (Q4_1, Q5_1). Scales are f16-exact values held as f32. The
/// activations of every 32-block format: llama.cpp's Q8_0 (`d`) and Q8_1 (`d` and `s`).
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

impl Acts for ActBlock {
    const ELEMS: usize = BLOCK;

    fn quantize(x: &[f32], out: &mut [Self]) {
        quantize_acts(x, out)
    }
}

#[inline(always)]
pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Quantizes `x` (a multiple of 32 long) into `out`, one block per 32 values, rounding as
/// llama.cpp does (ties to even, scales stored through f16) so both engines see the same
/// integers. Uses AVX2 where the CPU has it; the result is bit for bit the scalar one's.
pub fn quantize_acts(x: &[f32], out: &mut [ActBlock]) {
    assert_eq!(x.len(), out.len() * BLOCK, "quantize_acts: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if super::dot::has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above), and the lengths match.
        unsafe { avx2::quantize(x, out) };
        return;
    }
    quantize_acts_scalar(x, out);
}

/// The scalar reference of [`quantize_acts`].
pub fn quantize_acts_scalar(x: &[f32], out: &mut [ActBlock]) {
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{ActBlock, BLOCK};

    /// [`super::quantize_acts_scalar`] eight lanes at a time: the same products `v * id`,
    /// the same ties-to-even rounding, an exact maximum and an exact integer sum, so the
    /// same bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize(x: &[f32], out: &mut [ActBlock]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        for (chunk, blk) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
            let p = chunk.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
            );
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let idv = _mm256_set1_ps(id);
            let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
            let q = v.map(|v| {
                let r = _mm256_round_ps(
                    _mm256_mul_ps(v, idv),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                );
                _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(r), lo), hi)
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256(sum, 1),
            );
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            let sum = _mm_cvtsi128_si32(s);
            // i32 -> i16 -> i8 packs work per 128-bit lane; the permute puts the bytes back
            // in order.
            let w01 = _mm256_packs_epi32(q[0], q[1]);
            let w23 = _mm256_packs_epi32(q[2], q[3]);
            let b = _mm256_packs_epi16(w01, w23);
            let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(blk.qs.as_mut_ptr() as *mut __m256i, b);
            blk.d = f16::from_f32(d).to_f32();
            blk.s = f16::from_f32(d * sum as f32).to_f32();
        }
    }
}

/// Value `j` (0..32) of a 5-bit block: the nibble of `qs` (values 0..16 low nibbles, 16..32
/// high) with bit `j` of `qh` as bit 4.
#[inline(always)]
pub(crate) fn q5_quant(qh: u32, qs: &[u8], j: usize) -> i32 {
    let nibble = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
    i32::from(nibble) | (((qh >> j) & 1) << 4) as i32
}

#[inline(always)]
pub(crate) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Dequantizes one row of `k` weights of `kind` from its raw bytes (the reference for tests).
pub fn dequantize_row(kind: QuantKind, row: &[u8], out: &mut [f32]) {
    let bb = kind.block_bytes();
    for (b, o) in row
        .chunks_exact(bb)
        .zip(out.chunks_exact_mut(kind.block_elems()))
    {
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
            QuantKind::Q5_0 => {
                let qh = u32_at(b, 2);
                for (j, y) in o.iter_mut().enumerate() {
                    *y = d * (q5_quant(qh, &b[6..], j) - 16) as f32;
                }
            }
            QuantKind::Q5_1 => {
                let (m, qh) = (f16_at(b, 2), u32_at(b, 4));
                for (j, y) in o.iter_mut().enumerate() {
                    *y = d * q5_quant(qh, &b[8..], j) as f32 + m;
                }
            }
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => {
                super::kquants::dequantize_block(kind, b, o)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_data::random_row;
    use rand::{Rng, SeedableRng};

    /// [`dequantize_row`] against candle's own dequantization of the same bytes, an
    /// independent reading of every block layout.
    #[test]
    fn dequantization_equals_candle() -> anyhow::Result<()> {
        use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType as G};
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        for (kind, dtype) in [
            (QuantKind::Q4_0, G::Q4_0),
            (QuantKind::Q4_1, G::Q4_1),
            (QuantKind::Q8_0, G::Q8_0),
            (QuantKind::Q5_0, G::Q5_0),
            (QuantKind::Q5_1, G::Q5_1),
            (QuantKind::Q4K, G::Q4K),
            (QuantKind::Q5K, G::Q5K),
            (QuantKind::Q6K, G::Q6K),
        ] {
            assert_eq!(QuantKind::from_ggml(dtype), Some(kind));
            assert_eq!(kind.block_bytes(), dtype.type_size(), "{kind:?}");
            assert_eq!(kind.block_elems(), dtype.block_size(), "{kind:?}");
            let (rows, k) = (3, 2 * QK_K);
            let blocks = k / kind.block_elems();
            let bytes: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(kind, blocks, &mut rng))
                .collect();
            let q = qtensor_from_ggml(dtype, &bytes, vec![rows, k], &candle_core::Device::Cpu)?;
            let theirs = q
                .dequantize(&candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut ours = vec![0f32; rows * k];
            let rb = bytes.len() / rows;
            for (r, o) in ours.chunks_exact_mut(k).enumerate() {
                dequantize_row(kind, &bytes[r * rb..(r + 1) * rb], o);
            }
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{kind:?} value {i}: {a} vs candle {b}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn quantizer_equals_scalar_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for case in 0..200 {
            let blocks = 1 + case % 9;
            let scale = [1e-3f32, 1.0, 37.0, 1e4][case % 4];
            let mut x: Vec<f32> = (0..blocks * BLOCK)
                .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
                .collect();
            // Zero blocks, exact ties and the extremes.
            if case % 5 == 0 {
                x[..BLOCK].fill(0.0);
            }
            if case % 7 == 0 {
                x[1] = 0.5;
                x[2] = -2.5;
            }
            let (mut a, mut b) = (
                vec![ActBlock::default(); blocks],
                vec![ActBlock::default(); blocks],
            );
            quantize_acts(&x, &mut a);
            quantize_acts_scalar(&x, &mut b);
            for (p, q) in a.iter().zip(&b) {
                assert_eq!(p.qs, q.qs, "case {case}");
                assert_eq!(p.d.to_bits(), q.d.to_bits(), "case {case}");
                assert_eq!(p.s.to_bits(), q.s.to_bits(), "case {case}");
            }
        }
    }
}
