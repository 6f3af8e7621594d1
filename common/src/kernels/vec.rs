//! Vector primitives for attention over an f16 or f32 KV cache: `dot` and `axpy`, with
//! AVX2/F16C/FMA versions chosen at run time and scalar fallbacks.
#![allow(unsafe_code)]

use half::f16;

use super::dot::has_avx2;

/// A cached element type with SIMD helpers.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// To f32.
    fn f32(self) -> f32;
    /// From f32, rounding to nearest.
    fn from_f32(x: f32) -> Self;
    /// Rounds `x` the way an operand meeting this type is rounded (to f16 for f16).
    fn round(x: f32) -> f32;
    /// `Σ a[i] * b[i]`.
    fn dot(a: &[f32], b: &[Self]) -> f32;
    /// `o[i] += w * v[i]`.
    fn axpy(o: &mut [f32], w: f32, v: &[Self]);
}

impl KvElem for f16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn round(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
    fn dot(a: &[f32], b: &[f16]) -> f32 {
        assert_eq!(a.len(), b.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: avx2/fma/f16c detected; lengths equal.
            return unsafe { x86::dot_f16(a, b) };
        }
        a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
    }
    fn axpy(o: &mut [f32], w: f32, v: &[f16]) {
        assert_eq!(o.len(), v.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: as above.
            return unsafe { x86::axpy_f16(o, w, v) };
        }
        o.iter_mut().zip(v).for_each(|(x, y)| *x += w * y.to_f32());
    }
}

impl KvElem for f32 {
    fn f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn round(x: f32) -> f32 {
        x
    }
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: as above.
            return unsafe { x86::dot_f32(a, b) };
        }
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
    fn axpy(o: &mut [f32], w: f32, v: &[f32]) {
        assert_eq!(o.len(), v.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: as above.
            return unsafe { x86::axpy_f32(o, w, v) };
        }
        o.iter_mut().zip(v).for_each(|(x, y)| *x += w * y);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use crate::kernels::dot::avx2::hsum;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        let n = a.len() / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                load_f16(b.as_ptr().add(i)),
                acc,
            );
        }
        let mut s = hsum(acc);
        for i in n..a.len() {
            s += a[i] * b[i].to_f32();
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(o: &mut [f32], w: f32, v: &[f16]) {
        let n = o.len() / 8 * 8;
        let wv = _mm256_set1_ps(w);
        for i in (0..n).step_by(8) {
            let p = o.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                p,
                _mm256_fmadd_ps(wv, load_f16(v.as_ptr().add(i)), _mm256_loadu_ps(p)),
            );
        }
        for i in n..o.len() {
            o[i] += w * v[i].to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len() / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc,
            );
        }
        let mut s = hsum(acc);
        for i in n..a.len() {
            s += a[i] * b[i];
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f32(o: &mut [f32], w: f32, v: &[f32]) {
        let n = o.len() / 8 * 8;
        let wv = _mm256_set1_ps(w);
        for i in (0..n).step_by(8) {
            let p = o.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                p,
                _mm256_fmadd_ps(wv, _mm256_loadu_ps(v.as_ptr().add(i)), _mm256_loadu_ps(p)),
            );
        }
        for i in n..o.len() {
            o[i] += w * v[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_matches_scalar() {
        for n in [1usize, 7, 8, 64, 67] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b16: Vec<f16> = (0..n)
                .map(|i| f16::from_f32((i as f32 * 0.11).cos()))
                .collect();
            let b32: Vec<f32> = b16.iter().map(|x| x.to_f32()).collect();
            let want: f32 = a.iter().zip(&b32).map(|(x, y)| x * y).sum();
            assert!((f16::dot(&a, &b16) - want).abs() < 1e-4);
            assert!((f32::dot(&a, &b32) - want).abs() < 1e-4);
            let mut o1 = a.clone();
            let mut o2 = a.clone();
            f16::axpy(&mut o1, 0.5, &b16);
            f32::axpy(&mut o2, 0.5, &b32);
            for (i, (x, y)) in o1.iter().zip(&o2).enumerate() {
                let want = a[i] + 0.5 * b32[i];
                assert!((x - want).abs() < 1e-6 && (y - want).abs() < 1e-6);
            }
        }
    }
}
