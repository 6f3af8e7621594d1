//! Q8_K activations: blocks of 256 values quantized as llama.cpp's `quantize_row_q8_K_ref`
//! does, for the K-quants.

use super::QK_K;
use crate::kernels::blocks::Acts;

/// One Q8_K block of 256 quantized activations: `x ≈ d * qs`, with the sums of each 16
/// values kept for the K-quants' min terms (llama.cpp's `block_q8_K`).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct ActBlockK {
    /// Quantized values, in -127..=127.
    pub qs: [i8; QK_K],
    /// `bsums[g] = Σ qs[16g..16g + 16]`.
    pub bsums: [i16; QK_K / 16],
    /// Scale (an f32, not rounded through f16 as Q8_0's is).
    pub d: f32,
}

impl Default for ActBlockK {
    fn default() -> Self {
        ActBlockK {
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
            d: 0.0,
        }
    }
}

impl Acts for ActBlockK {
    const ELEMS: usize = QK_K;

    fn quantize(x: &[f32], out: &mut [Self]) {
        quantize_acts_k(x, out)
    }
}

/// llama.cpp's `nearest_int`: rounds to nearest, ties to even, for |v| < 2²² (adding 1.5·2²³
/// leaves the integer in the low mantissa bits).
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let t = v + 12_582_912.0;
    (t.to_bits() & 0x007F_FFFF) as i32 - 0x0040_0000
}

/// Quantizes `x` (a multiple of 256 long) into Q8_K blocks exactly as llama.cpp's
/// `quantize_row_q8_K_ref`: the value of largest magnitude (the first of equals, with its
/// sign) maps to -127, so `d = 1 / (-127 / max)` may be negative; every value is
/// `min(127, nearest_int(iscale · x))`; an all-zero block is all zero. Uses AVX2 where the
/// CPU has it; the result is bit for bit the scalar one's (for finite `x`).
pub fn quantize_acts_k(x: &[f32], out: &mut [ActBlockK]) {
    assert_eq!(
        x.len(),
        out.len() * QK_K,
        "quantize_acts_k: length mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::dot::has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above), and the lengths match.
        unsafe { avx2::quantize(x, out) };
        return;
    }
    quantize_acts_k_scalar(x, out);
}

/// The scalar reference of [`quantize_acts_k`].
pub fn quantize_acts_k_scalar(x: &[f32], out: &mut [ActBlockK]) {
    debug_assert_eq!(x.len(), out.len() * QK_K);
    for (chunk, blk) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in chunk {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *blk = ActBlockK::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in blk.qs.iter_mut().zip(chunk) {
            // One product, then the rounding add: llama.cpp's ggml-base is built without FMA.
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, g) in blk.bsums.iter_mut().zip(blk.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| i16::from(q)).sum();
        }
        blk.d = 1.0 / iscale;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActBlockK, QK_K};

    /// `|x|` of the 8 values at `p`.
    #[inline(always)]
    unsafe fn abs8(p: *const f32) -> __m256 {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        _mm256_and_ps(_mm256_loadu_ps(p), abs_mask)
    }

    /// `min(127, nearest_int(iscale · x))` of the 8 values at `p`.
    #[inline(always)]
    unsafe fn round8(p: *const f32, iscale: __m256) -> __m256i {
        let t = _mm256_add_ps(
            _mm256_mul_ps(_mm256_loadu_ps(p), iscale),
            _mm256_set1_ps(12_582_912.0),
        );
        let q = _mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(0x007F_FFFF));
        let q = _mm256_sub_epi32(q, _mm256_set1_epi32(0x0040_0000));
        _mm256_min_epi32(q, _mm256_set1_epi32(127))
    }

    /// [`super::quantize_acts_k_scalar`] eight lanes at a time: the same exact maximum
    /// magnitude, the same first value of that magnitude, the same products `iscale · x`
    /// followed by the same rounding add, and exact integer sums, so the same bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize(x: &[f32], out: &mut [ActBlockK]) {
        for (chunk, blk) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            let p = chunk.as_ptr();
            let mut m = abs8(p);
            for i in 1..QK_K / 8 {
                m = _mm256_max_ps(m, abs8(p.add(8 * i)));
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            if amax == 0.0 {
                *blk = ActBlockK::default();
                continue;
            }
            // The first value of that magnitude, as the scalar loop's strict `>` keeps it.
            let target = _mm256_set1_ps(amax);
            let mut first = 0;
            for i in 0..QK_K / 8 {
                let hit = _mm256_movemask_ps(_mm256_cmp_ps(abs8(p.add(8 * i)), target, _CMP_EQ_OQ));
                if hit != 0 {
                    first = 8 * i + hit.trailing_zeros() as usize;
                    break;
                }
            }
            let iscale = -127.0 / chunk[first];
            let iv = _mm256_set1_ps(iscale);
            for g in 0..QK_K / 32 {
                let at = p.add(32 * g);
                let q = [
                    round8(at, iv),
                    round8(at.add(8), iv),
                    round8(at.add(16), iv),
                    round8(at.add(24), iv),
                ];
                for (h, pair) in q.chunks_exact(2).enumerate() {
                    let s = _mm256_add_epi32(pair[0], pair[1]);
                    let s =
                        _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                    blk.bsums[2 * g + h] = _mm_cvtsi128_si32(s) as i16;
                }
                // i32 -> i16 -> i8 packs work per 128-bit lane; the permute restores the order.
                let b = _mm256_packs_epi16(
                    _mm256_packs_epi32(q[0], q[1]),
                    _mm256_packs_epi32(q[2], q[3]),
                );
                let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(blk.qs.as_mut_ptr().add(32 * g) as *mut __m256i, b);
            }
            blk.d = 1.0 / iscale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn quantize_one(x: &[f32]) -> ActBlockK {
        let mut b = [ActBlockK::default()];
        quantize_acts_k(x, &mut b);
        b[0]
    }

    #[test]
    fn q8_k_maps_the_signed_maximum_to_minus_127_and_rounds_ties_to_even() {
        // max = -127 (the largest magnitude, negative): iscale = 1, d = 1, q = round(x).
        let mut x = [0f32; QK_K];
        x[..8].copy_from_slice(&[-127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.6]);
        let b = quantize_one(&x);
        assert_eq!(b.d, 1.0);
        assert_eq!(b.qs[..8], [-127, 0, 2, 2, 0, -2, -2, 127]);
        assert_eq!(b.bsums[0], 0);

        // max = +4: iscale = -31.75, so d is negative and the signs flip; ±2 lands on ±63.5.
        let mut x = [0f32; QK_K];
        x[..5].copy_from_slice(&[4.0, -2.0, 2.0, 1.0, -4.0]);
        x[200] = 3.0;
        let b = quantize_one(&x);
        assert_eq!(b.d, 1.0 / -31.75);
        assert_eq!(b.qs[..5], [-127, 64, -64, -32, 127]);
        assert_eq!(b.qs[200], -95); // -95.25
        assert_eq!(b.bsums[0], -32);
        assert_eq!(b.bsums[12], -95);
        assert!(b
            .bsums
            .iter()
            .enumerate()
            .all(|(g, &s)| g == 0 || g == 12 || s == 0));

        // Equal magnitudes: the first one's sign decides.
        let mut x = [0f32; QK_K];
        x[3] = -3.0;
        x[7] = 3.0;
        let b = quantize_one(&x);
        assert_eq!((b.qs[3], b.qs[7]), (-127, 127));
        assert_eq!(b.d, 1.0 / (-127.0 / -3.0));
        x[3] = 3.0;
        x[7] = -3.0;
        let b = quantize_one(&x);
        assert_eq!((b.qs[3], b.qs[7]), (-127, 127));
        assert_eq!(b.d, 1.0 / (-127.0 / 3.0));
    }

    #[test]
    fn q8_k_zero_block_is_all_zero_and_blocks_are_independent() {
        let mut x = vec![0f32; 2 * QK_K];
        x[QK_K + 1] = -0.25;
        let mut b = [ActBlockK::default(); 2];
        b[0].qs[0] = 9;
        b[0].bsums[0] = 9;
        b[0].d = 9.0;
        quantize_acts_k(&x, &mut b);
        assert_eq!((b[0].d, b[0].qs, b[0].bsums), (0.0, [0; QK_K], [0; 16]));
        assert_eq!(b[1].d, 1.0 / (-127.0 / -0.25));
        assert_eq!((b[1].qs[1], b[1].bsums[0]), (-127, -127));
    }

    #[test]
    fn nearest_int_is_llama_cpp_rounding() {
        for (v, want) in [
            (0.5f32, 0),
            (1.5, 2),
            (-1.5, -2),
            (2.5, 2),
            (-126.5, -126),
            (126.49, 126),
            (-0.49, 0),
        ] {
            assert_eq!(nearest_int(v), want, "{v}");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for _ in 0..10_000 {
            let v = rng.gen_range(-200.0f32..200.0);
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
    }

    #[test]
    fn quantizer_equals_scalar_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for case in 0..200 {
            let blocks = 1 + case % 4;
            let scale = [1e-3f32, 1.0, 37.0, 1e4][case % 4];
            let mut x: Vec<f32> = (0..blocks * QK_K)
                .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
                .collect();
            // Zero blocks, ties of magnitude, exact rounding ties.
            if case % 5 == 0 {
                x[..QK_K].fill(0.0);
            }
            if case % 3 == 0 {
                let at = rng.gen_range(0..QK_K - 9);
                x[at] = -2.0 * scale;
                x[at + 9] = 2.0 * scale;
            }
            if case % 7 == 0 {
                x[QK_K - 1] = -127.0;
                x[QK_K - 2] = 2.5;
                x[QK_K - 3] = -0.5;
            }
            let mut a = vec![ActBlockK::default(); blocks];
            let mut b = vec![ActBlockK::default(); blocks];
            quantize_acts_k(&x, &mut a);
            quantize_acts_k_scalar(&x, &mut b);
            for (p, q) in a.iter().zip(&b) {
                assert_eq!(p.qs, q.qs, "case {case}");
                assert_eq!(p.bsums, q.bsums, "case {case}");
                assert_eq!(p.d.to_bits(), q.d.to_bits(), "case {case}");
            }
        }
    }
}
