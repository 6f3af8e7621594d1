//! Dot products of one quantized weight row with one row of quantized activations.
//!
//! `row` holds the raw GGUF blocks of one weight row; `acts` the matching activation blocks.
//! The AVX2 versions are llama.cpp's integer schemes; [`dot_scalar`] is the reference.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use super::blocks::{f16_at, ActBlock, QuantKind};

/// A dot-product kernel: (weight row bytes, activation blocks) -> f32.
pub type DotFn = fn(&[u8], &[ActBlock]) -> f32;

/// Scalar reference for every kind.
pub fn dot_scalar(kind: QuantKind, row: &[u8], acts: &[ActBlock]) -> f32 {
    let bb = kind.block_bytes();
    let mut acc = 0f32;
    for (b, a) in row.chunks_exact(bb).zip(acts) {
        let d = f16_at(b, 0);
        match kind {
            QuantKind::Q4_0 => {
                let mut s = 0i32;
                for j in 0..16 {
                    s += (i32::from(b[2 + j] & 0xF) - 8) * i32::from(a.qs[j]);
                    s += (i32::from(b[2 + j] >> 4) - 8) * i32::from(a.qs[j + 16]);
                }
                acc += d * a.d * s as f32;
            }
            QuantKind::Q4_1 => {
                let m = f16_at(b, 2);
                let mut s = 0i32;
                for j in 0..16 {
                    s += i32::from(b[4 + j] & 0xF) * i32::from(a.qs[j]);
                    s += i32::from(b[4 + j] >> 4) * i32::from(a.qs[j + 16]);
                }
                acc += d * a.d * s as f32 + m * a.s;
            }
            QuantKind::Q8_0 => {
                let mut s = 0i32;
                for j in 0..32 {
                    s += i32::from(b[2 + j] as i8) * i32::from(a.qs[j]);
                }
                acc += d * a.d * s as f32;
            }
        }
    }
    acc
}

fn scalar_q4_0(row: &[u8], acts: &[ActBlock]) -> f32 {
    dot_scalar(QuantKind::Q4_0, row, acts)
}
fn scalar_q4_1(row: &[u8], acts: &[ActBlock]) -> f32 {
    dot_scalar(QuantKind::Q4_1, row, acts)
}
fn scalar_q8_0(row: &[u8], acts: &[ActBlock]) -> f32 {
    dot_scalar(QuantKind::Q8_0, row, acts)
}

/// The fastest kernel this CPU supports for `kind`, detected once.
pub fn best(kind: QuantKind) -> DotFn {
    static TABLE: OnceLock<[DotFn; 3]> = OnceLock::new();
    let t = TABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return [avx2::q4_0 as DotFn, avx2::q4_1, avx2::q8_0];
        }
        [scalar_q4_0 as DotFn, scalar_q4_1, scalar_q8_0]
    });
    match kind {
        QuantKind::Q4_0 => t[0],
        QuantKind::Q4_1 => t[1],
        QuantKind::Q8_0 => t[2],
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{f16_at, ActBlock};

    // Safe wrappers: `best` hands these out only after detecting avx2 and fma.
    pub fn q4_0(row: &[u8], acts: &[ActBlock]) -> f32 {
        assert!(row.len() >= acts.len() * 18);
        // SAFETY: avx2+fma were detected before this fn was selected; lengths checked above.
        unsafe { q4_0_impl(row, acts) }
    }
    pub fn q4_1(row: &[u8], acts: &[ActBlock]) -> f32 {
        assert!(row.len() >= acts.len() * 20);
        // SAFETY: as above.
        unsafe { q4_1_impl(row, acts) }
    }
    pub fn q8_0(row: &[u8], acts: &[ActBlock]) -> f32 {
        assert!(row.len() >= acts.len() * 34);
        // SAFETY: as above.
        unsafe { q8_0_impl(row, acts) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 16 bytes of packed nibbles -> 32 bytes: low nibbles in lanes 0..16, high in 16..32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Σ (unsigned a[i] * signed b[i]) as 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_us(a: __m256i, b: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(a, b);
        let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        _mm256_cvtepi32_ps(p32)
    }

    /// Σ (signed a[i] * signed b[i]) as 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_ss(a: __m256i, b: __m256i) -> __m256 {
        let ax = _mm256_sign_epi8(a, a);
        let sb = _mm256_sign_epi8(b, a);
        dot_us(ax, sb)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4_1_impl(row: &[u8], acts: &[ActBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        let p = row.as_ptr();
        for (i, a) in acts.iter().enumerate() {
            let b = p.add(i * 20);
            let d = f16_at(row, i * 20);
            let m = f16_at(row, i * 20 + 2);
            mins += m * a.s;
            let qx = nibbles(b.add(4));
            let qy = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), dot_us(qx, qy), acc);
        }
        hsum(acc) + mins
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4_0_impl(row: &[u8], acts: &[ActBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let p = row.as_ptr();
        for (i, a) in acts.iter().enumerate() {
            let d = f16_at(row, i * 18);
            let qx = _mm256_sub_epi8(nibbles(p.add(i * 18 + 2)), _mm256_set1_epi8(8));
            let qy = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), dot_ss(qx, qy), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q8_0_impl(row: &[u8], acts: &[ActBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let p = row.as_ptr();
        for (i, a) in acts.iter().enumerate() {
            let d = f16_at(row, i * 34);
            let qx = _mm256_loadu_si256(p.add(i * 34 + 2) as *const __m256i);
            let qy = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), dot_ss(qx, qy), acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::blocks::{dequantize_row, quantize_acts, BLOCK};
    use half::f16;
    use rand::{Rng, SeedableRng};

    fn random_row(kind: QuantKind, blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
        let mut row = Vec::new();
        for _ in 0..blocks {
            row.extend_from_slice(&f16::from_f32(rng.gen_range(-0.1..0.1)).to_le_bytes());
            let rest = kind.block_bytes() - 2;
            if kind == QuantKind::Q4_1 {
                row.extend_from_slice(&f16::from_f32(rng.gen_range(-0.5..0.5)).to_le_bytes());
                row.extend((0..rest - 2).map(|_| rng.gen::<u8>()));
            } else {
                row.extend((0..rest).map(|_| rng.gen::<u8>()));
            }
        }
        row
    }

    #[test]
    fn simd_matches_scalar_and_float_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for kind in [QuantKind::Q4_0, QuantKind::Q4_1, QuantKind::Q8_0] {
            for blocks in [1usize, 3, 18, 48] {
                let row = random_row(kind, blocks, &mut rng);
                let x: Vec<f32> = (0..blocks * BLOCK).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let mut acts = vec![ActBlock::default(); blocks];
                quantize_acts(&x, &mut acts);
                let fast = best(kind)(&row, &acts);
                let slow = dot_scalar(kind, &row, &acts);
                assert!((fast - slow).abs() <= 1e-4 * (1.0 + slow.abs()), "{kind:?} {fast} {slow}");
                let mut w = vec![0f32; blocks * BLOCK];
                dequantize_row(kind, &row, &mut w);
                let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
                let tol = 0.02 * w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum::<f32>() + 1e-3;
                assert!((fast - exact).abs() <= tol, "{kind:?} {fast} vs {exact} (tol {tol})");
            }
        }
    }
}
