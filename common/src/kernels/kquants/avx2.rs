//! AVX2 kernels of the K-quants: llama.cpp's `ggml_vec_dot_q{4,5,6}_K_q8_K` for `N` tokens
//! at once.
//!
//! Each kind has one function, `*_dots::<N>`, giving one weight row's products with `N`
//! tokens: each super-block is unpacked once (values, scales) and dotted with every token,
//! and each token's sums are formed exactly as llama.cpp's one-token AVX2 kernel forms them
//! (and as [`super::dot_scalar`] reproduces): integer lanes per super-block, one f32 FMA per
//! lane and super-block, the min terms apart, the same horizontal sums. The row kernels are
//! `N = 1`, the tiles `N = 4`, so a token gets bit for bit what it gets alone.

use std::arch::x86_64::*;

use super::ActBlockK;
use crate::kernels::dot::avx2::{f16x2, hsum, prefetch_ahead};
use crate::kernels::dot::TILE;

/// The bounds every kernel relies on: the tokens' rows all `kb` blocks long, and `rows` weight
/// rows from `row0`, `rb` bytes apart, each holding at least `kb` super-blocks of `bb` bytes.
pub(super) fn check(
    w: &[u8],
    rb: usize,
    acts: &[&[ActBlockK]],
    rows: usize,
    row0: usize,
    bb: usize,
) {
    let kb = acts[0].len();
    assert!(acts.iter().all(|t| t.len() == kb));
    assert!(rb >= kb * bb);
    assert!(w.len() >= (row0 + rows) * rb);
}

// Safe entry points: `best` and `best_tile` hand these out only after detecting AVX2, FMA
// and F16C, and the bounds are checked here once per call.
macro_rules! entries {
    ($rows:ident, $tile:ident, $dots:ident, $bb:literal) => {
        pub fn $rows(w: &[u8], rb: usize, a: &[ActBlockK], o: &mut [f32], r0: usize) {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn k(w: &[u8], rb: usize, a: &[ActBlockK], o: &mut [f32], r0: usize) {
                for (i, y) in o.iter_mut().enumerate() {
                    *y = $dots::<1>(w.as_ptr().add((r0 + i) * rb), &[a])[0];
                }
            }
            check(w, rb, &[a], o.len(), r0, $bb);
            // SAFETY: features detected by `best`; reads within the checked bounds.
            unsafe { k(w, rb, a, o, r0) }
        }

        pub fn $tile(
            w: &[u8],
            rb: usize,
            a: [&[ActBlockK]; TILE],
            o: &mut [[f32; TILE]],
            r0: usize,
        ) {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn k(
                w: &[u8],
                rb: usize,
                a: [&[ActBlockK]; TILE],
                o: &mut [[f32; TILE]],
                r0: usize,
            ) {
                for (i, y) in o.iter_mut().enumerate() {
                    *y = $dots::<TILE>(w.as_ptr().add((r0 + i) * rb), &a);
                }
            }
            check(w, rb, &a, o.len(), r0, $bb);
            // SAFETY: features detected by `best_tile`; reads within the checked bounds.
            unsafe { k(w, rb, a, o, r0) }
        }
    };
}
entries!(q4_k, q4_k_tile, q4_k_dots, 144);
entries!(q5_k, q5_k_tile, q5_k_dots, 176);
entries!(q6_k, q6_k_tile, q6_k_dots, 210);

/// Four lanes summed as llama.cpp sums Q4_K's min terms: `(0 + 2) + (1 + 3)`.
#[inline(always)]
unsafe fn hsum4(v: __m128) -> f32 {
    let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// A Q4_K/Q5_K super-block's eight scales (i16 lanes 0..8) and eight mins (lanes 8..16), from
/// the 12 packed bytes at `p`: llama.cpp's `utmp` shuffle, [`super::scales_mins`] in bulk.
#[inline(always)]
unsafe fn scales_mins(p: *const u8) -> __m256i {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    let u0 = std::ptr::read_unaligned(p as *const u32);
    let u1 = std::ptr::read_unaligned(p.add(4) as *const u32);
    let u2 = std::ptr::read_unaligned(p.add(8) as *const u32);
    let sc_lo = u0 & K1;
    let sc_hi = (u2 & K2) | (((u0 >> 6) & K3) << 4);
    let m_lo = u1 & K1;
    let m_hi = ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4);
    _mm256_cvtepu8_epi16(_mm_set_epi32(
        m_hi as i32,
        m_lo as i32,
        sc_hi as i32,
        sc_lo as i32,
    ))
}

/// The four i32 min products of a token (see [`super::block_ints`]):
/// `madd(mins, hadd(bsums[0..8], bsums[8..16]))`.
#[inline(always)]
unsafe fn min_products(sm: __m256i, a: &ActBlockK) -> __m128i {
    let bs = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
    let q8s = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
    _mm_madd_epi16(_mm256_extracti128_si256(sm, 1), q8s)
}

/// Scale `j` of `sc` (i16 lanes 0..8 in both halves) in every i16 lane.
#[inline(always)]
unsafe fn scale(sc: __m256i, j: usize) -> __m256i {
    let idx = (((2 * j + 1) << 8) | (2 * j)) as i16;
    _mm256_shuffle_epi8(sc, _mm256_set1_epi16(idx))
}

/// `sumi + madd(sc, p)`: i16 pair sums times i16 scales, added to i32 lanes.
#[inline(always)]
unsafe fn add_scaled(sumi: __m256i, sc: __m256i, p: __m256i) -> __m256i {
    _mm256_add_epi32(sumi, _mm256_madd_epi16(sc, p))
}

/// `maddubs(q, q8)` for the 32 activations at `q8`: i16 lane `i` is `q·q8` over values
/// `2i, 2i + 1` (no sum saturates: `q < 64`, `|q8| ≤ 127`).
#[inline(always)]
unsafe fn pairs(q: __m256i, q8: *const i8) -> __m256i {
    _mm256_maddubs_epi16(q, _mm256_loadu_si256(q8 as *const __m256i))
}

/// Block `k` of each of the `N` tokens.
#[inline(always)]
unsafe fn blocks_at<'a, const N: usize>(
    acts: &[&'a [ActBlockK]; N],
    k: usize,
) -> [&'a ActBlockK; N] {
    let mut a = [acts[0].get_unchecked(k); N];
    for (t, x) in a.iter_mut().enumerate().skip(1) {
        *x = acts[t].get_unchecked(k);
    }
    a
}

/// Q4_K or Q5_K (with `qh`): per super-block, `d = ad·d`, `dmin = -ad·dmin`, the lanes of
/// Σ scale·q·q8 with `acc = fma(d, lanes, acc)`, and then
/// - Q4_K: the min products in four lanes, `acc_m = fma(dmin, mins, acc_m)`, and at the end
///   `hsum(acc) + hsum4(acc_m)`;
/// - Q5_K: their integer sum, `summs = fma(dmin, Σ mins, summs)` (the FMA GCC and clang make
///   of llama.cpp's `summs += dmin * Σ`), and at the end `hsum(acc) + summs`.
#[inline(always)]
unsafe fn q45_k_dots<const N: usize, const Q5: bool>(
    p: *const u8,
    acts: &[&[ActBlockK]; N],
) -> [f32; N] {
    let (bb, qs_at) = if Q5 { (176, 48) } else { (144, 16) };
    let m4 = _mm256_set1_epi8(0xF);
    let sixteen = _mm256_set1_epi8(16);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut acc_m = [_mm_setzero_ps(); N];
    let mut summs = [0f32; N];
    for k in 0..acts[0].len() {
        let b = p.add(k * bb);
        for line in (0..bb).step_by(64) {
            prefetch_ahead(b, line);
        }
        let a = blocks_at(acts, k);
        let dm = f16x2(b);
        let (d, dmin) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
        let sm = scales_mins(b.add(4));
        let sc = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm));
        let hbits = if Q5 {
            _mm256_loadu_si256(b.add(16) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        let mut sumi = [_mm256_setzero_si256(); N];
        for j in 0..4 {
            let bits = _mm256_loadu_si256(b.add(qs_at + 32 * j) as *const __m256i);
            let mut lo = _mm256_and_si256(bits, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            if Q5 {
                // Bit 2j of qh[i] is bit 4 of value i of chunk 2j, bit 2j + 1 of chunk 2j + 1.
                let (bl, bh) = ((1u8 << (2 * j)) as i8, (2u8 << (2 * j)) as i8);
                let (bl, bh) = (_mm256_set1_epi8(bl), _mm256_set1_epi8(bh));
                let set_l = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bl), bl);
                let set_h = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bh), bh);
                lo = _mm256_or_si256(lo, _mm256_and_si256(set_l, sixteen));
                hi = _mm256_or_si256(hi, _mm256_and_si256(set_h, sixteen));
            }
            let (sl, sh) = (scale(sc, 2 * j), scale(sc, 2 * j + 1));
            for t in 0..N {
                let q8 = a[t].qs.as_ptr().add(64 * j);
                sumi[t] = add_scaled(sumi[t], sl, pairs(lo, q8));
                sumi[t] = add_scaled(sumi[t], sh, pairs(hi, q8.add(32)));
            }
        }
        for t in 0..N {
            let (dt, mt) = (a[t].d * d, -a[t].d * dmin);
            let prod = min_products(sm, a[t]);
            if Q5 {
                let s = _mm_add_epi32(prod, _mm_shuffle_epi32(prod, 0b01_00_11_10));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                summs[t] = mt.mul_add(_mm_cvtsi128_si32(s) as f32, summs[t]);
            } else {
                acc_m[t] = _mm_fmadd_ps(_mm_set1_ps(mt), _mm_cvtepi32_ps(prod), acc_m[t]);
            }
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dt), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = if Q5 {
            hsum(acc[t]) + summs[t]
        } else {
            hsum(acc[t]) + hsum4(acc_m[t])
        };
    }
    out
}

#[inline(always)]
pub(super) unsafe fn q4_k_dots<const N: usize>(p: *const u8, acts: &[&[ActBlockK]; N]) -> [f32; N] {
    q45_k_dots::<N, false>(p, acts)
}

#[inline(always)]
pub(super) unsafe fn q5_k_dots<const N: usize>(p: *const u8, acts: &[&[ActBlockK]; N]) -> [f32; N] {
    q45_k_dots::<N, true>(p, acts)
}

/// Low nibbles `lo` with the low two bits of each byte of `h` as bits 4 and 5.
#[inline(always)]
unsafe fn six_bits(lo: __m256i, h: __m256i, m3: __m256i) -> __m256i {
    _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(h, m3), 4))
}

/// Q6_K: per super-block, `d = ad·d` and the lanes of Σ scale·(q − 32)·q8, the `- 32` taken
/// as llama.cpp does (`maddubs(q, q8) - maddubs(32, q8)` in i16, then the scale), and
/// `acc = fma(d, lanes, acc)`; at the end `hsum(acc)`.
#[inline(always)]
pub(super) unsafe fn q6_k_dots<const N: usize>(p: *const u8, acts: &[&[ActBlockK]; N]) -> [f32; N] {
    let m4 = _mm256_set1_epi8(0xF);
    let m3 = _mm256_set1_epi8(3);
    let m32 = _mm256_set1_epi8(32);
    let mut acc = [_mm256_setzero_ps(); N];
    for k in 0..acts[0].len() {
        let b = p.add(k * 210);
        for line in (0..210).step_by(64) {
            prefetch_ahead(b, line);
        }
        let a = blocks_at(acts, k);
        let d = _mm_cvtss_f32(f16x2(b.add(208)));
        let scales = _mm_loadu_si128(b.add(192) as *const __m128i);
        let mut sumi = [_mm256_setzero_si256(); N];
        for j in 0..2 {
            let l1 = _mm256_loadu_si256(b.add(64 * j) as *const __m256i);
            let l2 = _mm256_loadu_si256(b.add(64 * j + 32) as *const __m256i);
            let h = _mm256_loadu_si256(b.add(128 + 32 * j) as *const __m256i);
            let q = [
                six_bits(_mm256_and_si256(l1, m4), h, m3),
                six_bits(_mm256_and_si256(l2, m4), _mm256_srli_epi16(h, 2), m3),
                six_bits(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    _mm256_srli_epi16(h, 4),
                    m3,
                ),
                six_bits(
                    _mm256_and_si256(_mm256_srli_epi16(l2, 4), m4),
                    _mm256_srli_epi16(h, 6),
                    m3,
                ),
            ];
            // Chunk c of this half: values 0..16 take scale 8j + 2c, values 16..32 the next.
            let mut sc = [_mm256_setzero_si256(); 4];
            for (c, s) in sc.iter_mut().enumerate() {
                let i = (4 * j + c) as i64;
                let pick = _mm_set_epi64x(
                    0x0101_0101_0101_0101 * (2 * i + 1),
                    0x0101_0101_0101_0101 * (2 * i),
                );
                *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
            }
            for t in 0..N {
                let q8 = a[t].qs.as_ptr().add(128 * j);
                for c in 0..4 {
                    let x = q8.add(32 * c);
                    sumi[t] = add_scaled(
                        sumi[t],
                        sc[c],
                        _mm256_sub_epi16(pairs(q[c], x), pairs(m32, x)),
                    );
                }
            }
        }
        for t in 0..N {
            let dt = _mm256_set1_ps(a[t].d * d);
            acc[t] = _mm256_fmadd_ps(dt, _mm256_cvtepi32_ps(sumi[t]), acc[t]);
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = hsum(acc[t]);
    }
    out
}
