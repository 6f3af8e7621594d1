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
    /// Row `r` of `dst` (rows of `width`) = `src[r * stride..][..width]` as f32 (exact), for
    /// every row of `dst`: a strided block of a cache, widened in one call.
    fn widen_rows(src: &[Self], stride: usize, width: usize, dst: &mut [f32]);
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
    fn widen_rows(src: &[f16], stride: usize, width: usize, dst: &mut [f32]) {
        let rows = dst.len() / width.max(1);
        assert!(rows == 0 || (rows - 1) * stride + width <= src.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: as above; every row is within `src` (checked).
            return unsafe { x86::widen_rows_f16(src, stride, width, dst) };
        }
        for (r, d) in dst.chunks_exact_mut(width).enumerate() {
            d.iter_mut()
                .zip(&src[r * stride..r * stride + width])
                .for_each(|(d, s)| *d = s.to_f32());
        }
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
    fn widen_rows(src: &[f32], stride: usize, width: usize, dst: &mut [f32]) {
        for (r, d) in dst.chunks_exact_mut(width).enumerate() {
            d.copy_from_slice(&src[r * stride..r * stride + width]);
        }
    }
}

/// `out[j] = f32::dot(q, row j of k)` for the `out.len()` rows of `k` (each `q.len()` wide,
/// contiguous), every sum formed exactly as [`KvElem::dot`] forms it; on AVX2, four rows at a
/// time, so the four sums' dependency chains overlap.
pub fn dots(q: &[f32], k: &[f32], out: &mut [f32]) {
    assert_eq!(k.len(), q.len() * out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: avx2/fma detected; lengths checked.
        return unsafe { x86::dots_f32(q, k, out) };
    }
    for (o, row) in out.iter_mut().zip(k.chunks_exact(q.len().max(1))) {
        *o = f32::dot(q, row);
    }
}

/// `o = Σ_j w[j] · row j of v`, starting from zero: bit for bit what `o.fill(0)` and then
/// [`KvElem::axpy`] of every row in order give, with `o` held in registers.
pub fn weighted_sum(o: &mut [f32], w: &[f32], v: &[f32]) {
    assert_eq!(v.len(), o.len() * w.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::weighted_sum_f32(o, w, v) };
    }
    o.fill(0.0);
    for (&x, row) in w.iter().zip(v.chunks_exact(o.len().max(1))) {
        f32::axpy(o, x, row);
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
    pub unsafe fn widen_rows_f16(src: &[f16], stride: usize, width: usize, dst: &mut [f32]) {
        let n = width / 8 * 8;
        for (r, d) in dst.chunks_exact_mut(width).enumerate() {
            let s = src.as_ptr().add(r * stride);
            for i in (0..n).step_by(8) {
                _mm256_storeu_ps(d.as_mut_ptr().add(i), load_f16(s.add(i)));
            }
            for (i, x) in d.iter_mut().enumerate().skip(n) {
                *x = (*s.add(i)).to_f32();
            }
        }
    }

    /// See [`super::dots`]: each row's sum is [`dot_f32`]'s, four rows side by side.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots_f32(q: &[f32], k: &[f32], out: &mut [f32]) {
        let hd = q.len();
        let n8 = hd / 8 * 8;
        let rows = out.len();
        let mut j = 0;
        while j + 4 <= rows {
            let b = k.as_ptr().add(j * hd);
            let mut acc = [_mm256_setzero_ps(); 4];
            for i in (0..n8).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(i));
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(b.add(t * hd + i)), *a);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                let mut s = hsum(*a);
                for i in n8..hd {
                    s += q[i] * k[(j + t) * hd + i];
                }
                out[j + t] = s;
            }
            j += 4;
        }
        for j in j..rows {
            out[j] = dot_f32(q, &k[j * hd..(j + 1) * hd]);
        }
    }

    /// See [`super::weighted_sum`]: 32 lanes of `o` in registers at a time, each lane the
    /// chain of fused multiply-adds [`axpy_f32`] forms, from zero.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum_f32(o: &mut [f32], w: &[f32], v: &[f32]) {
        let hd = o.len();
        let n8 = hd / 8 * 8;
        let mut i = 0;
        while i < n8 {
            let lanes = ((n8 - i) / 8).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            for (j, &x) in w.iter().enumerate() {
                let wv = _mm256_set1_ps(x);
                let row = v.as_ptr().add(j * hd + i);
                for (l, a) in acc.iter_mut().enumerate().take(lanes) {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(l * 8)), *a);
                }
            }
            for (l, a) in acc.iter().enumerate().take(lanes) {
                _mm256_storeu_ps(o.as_mut_ptr().add(i + l * 8), *a);
            }
            i += lanes * 8;
        }
        for i in n8..hd {
            let mut s = 0f32;
            for (j, &x) in w.iter().enumerate() {
                s += x * v[j * hd + i];
            }
            o[i] = s;
        }
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
    fn dots_and_weighted_sums_equal_dot_and_axpy_bit_for_bit() {
        for hd in [1usize, 8, 12, 64, 67, 128] {
            for rows in [1usize, 3, 4, 9] {
                let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.37).sin()).collect();
                let k16: Vec<f16> = (0..hd * rows)
                    .map(|i| f16::from_f32((i as f32 * 0.11).cos() * 3.0))
                    .collect();
                let mut k = vec![0f32; hd * rows];
                f16::widen_rows(&k16, hd, hd, &mut k);
                let mut got = vec![0f32; rows];
                dots(&q, &k, &mut got);
                let w: Vec<f32> = (0..rows).map(|j| (j as f32 * 0.7).sin()).collect();
                let mut sum = vec![7f32; hd];
                weighted_sum(&mut sum, &w, &k);
                let mut want_sum = vec![0f32; hd];
                for j in 0..rows {
                    let row = &k16[j * hd..(j + 1) * hd];
                    assert_eq!(
                        got[j].to_bits(),
                        f16::dot(&q, row).to_bits(),
                        "hd {hd} row {j}"
                    );
                    f16::axpy(&mut want_sum, w[j], row);
                }
                for (a, b) in sum.iter().zip(&want_sum) {
                    assert_eq!(a.to_bits(), b.to_bits(), "hd {hd} rows {rows}");
                }
            }
        }
    }

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
