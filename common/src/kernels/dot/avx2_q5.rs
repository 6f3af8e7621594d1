//! AVX2 (and AVX-VNNI) kernels of the 5-bit formats Q5_0 and Q5_1: the nibbles of Q4_0 and
//! Q4_1 with a fifth bit from `qh`, dotted as llama.cpp's `ggml_vec_dot_q5_0_q8_0` and
//! `ggml_vec_dot_q5_1_q8_1` do on AVX2. Their safe entry points are in [`super::avx2`].

use std::arch::x86_64::*;

use super::avx2::{acts_q, dot_ss, f16x2, hsum, nibbles, pair_rows, tile_scales, Dot};
use super::{ActBlock, TILE};

/// The 32 bits at `p` (little-endian) as 32 bytes, 0xFF where bit `j` is set: llama.cpp's
/// `bytes_from_bits_32`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn bits(p: *const u8) -> __m256i {
    let x = std::ptr::read_unaligned(p as *const i32);
    // Byte j takes byte j / 8 of `x`, then every bit but j % 8 is set.
    let spread = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), spread);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// The 32 values of a Q5_0 block's `qh` (at `p`) and `qs` as signed bytes `q - 16`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q5_0_quants(p: *const u8) -> __m256i {
    let hi = _mm256_andnot_si256(bits(p), _mm256_set1_epi8(0xF0u8 as i8));
    _mm256_or_si256(nibbles(p.add(4)), hi)
}

/// The 32 values of a Q5_1 block's `qh` (at `p`) and `qs` as unsigned bytes `q`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q5_1_quants(p: *const u8) -> __m256i {
    let hi = _mm256_and_si256(bits(p), _mm256_set1_epi8(0x10));
    _mm256_or_si256(nibbles(p.add(4)), hi)
}

/// One Q5_0 block's contribution: `acc += (d·ad) · Σ q·qa`.
#[inline(always)]
unsafe fn q5_0_block<D: Dot>(b: *const u8, a: &ActBlock, qa: __m256i, acc: &mut __m256) {
    let d = _mm256_set1_ps(_mm_cvtss_f32(f16x2(b)) * a.d);
    *acc = _mm256_fmadd_ps(d, dot_ss::<D>(q5_0_quants(b.add(2)), qa), *acc);
}

/// One Q5_1 block's contribution: `acc += (d·ad) · Σ q·qa`, and `m·s` returned (exact in f32,
/// a product of two f16 values, so it is llama.cpp's `summs += m * s` whether or not a
/// compiler fuses that).
#[inline(always)]
unsafe fn q5_1_block<D: Dot>(b: *const u8, a: &ActBlock, qa: __m256i, acc: &mut __m256) -> f32 {
    let dm = f16x2(b);
    let d = _mm_cvtss_f32(dm);
    let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
    let s = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_set1_ps(a.d));
    *acc = _mm256_fmadd_ps(s, D::dot_us(q5_1_quants(b.add(4)), qa), *acc);
    m * a.s
}

// Per row: one accumulator over the blocks in order (plus, for Q5_1, the min term summed in
// scalar f32), llama.cpp's order. Two rows run interleaved to hide the FMA latency without
// changing that order.
#[inline(always)]
pub(crate) unsafe fn q5_0_rows<D: Dot>(
    w: &[u8],
    rb: usize,
    acts: &[ActBlock],
    out: &mut [f32],
    row0: usize,
) {
    pair_rows::<false>(w, rb, acts, out, row0, 22, |b, a, qa, acc| {
        q5_0_block::<D>(b, a, qa, acc);
        0.0
    });
}

#[inline(always)]
pub(crate) unsafe fn q5_1_rows<D: Dot>(
    w: &[u8],
    rb: usize,
    acts: &[ActBlock],
    out: &mut [f32],
    row0: usize,
) {
    pair_rows::<true>(w, rb, acts, out, row0, 24, |b, a, qa, acc| {
        q5_1_block::<D>(b, a, qa, acc)
    });
}

// A Q5_0 tile, in the order of `q5_0_rows`: the block's |q| and signs are formed once for the
// four tokens.
#[inline(always)]
pub(crate) unsafe fn q5_0_tile_rows<D: Dot>(
    w: &[u8],
    rb: usize,
    acts: [&[ActBlock]; TILE],
    out: &mut [[f32; TILE]],
    row0: usize,
) {
    let kb = acts[0].len();
    for (i, y) in out.iter_mut().enumerate() {
        let p = w.as_ptr().add((row0 + i) * rb);
        let mut acc = [_mm256_setzero_ps(); TILE];
        for k in 0..kb {
            let b = p.add(k * 22);
            let d = _mm_cvtss_f32(f16x2(b));
            let q = q5_0_quants(b.add(2));
            let qabs = _mm256_sign_epi8(q, q);
            let (a, _) = tile_scales(&acts, k);
            for j in 0..TILE {
                let sc = _mm256_set1_ps(d * a[j].d);
                let x = _mm256_sign_epi8(acts_q(a[j]), q);
                acc[j] = _mm256_fmadd_ps(sc, D::dot_us(qabs, x), acc[j]);
            }
        }
        for j in 0..TILE {
            y[j] = hsum(acc[j]);
        }
    }
}

// A Q5_1 tile: per row and token, one vector accumulator over the blocks in order plus the min
// term summed in f32 (four tokens' min terms side by side: lane j computes exactly
// `mins += m * s_j`), the order of `q5_1_rows`.
#[inline(always)]
pub(crate) unsafe fn q5_1_tile_rows<D: Dot>(
    w: &[u8],
    rb: usize,
    acts: [&[ActBlock]; TILE],
    out: &mut [[f32; TILE]],
    row0: usize,
) {
    let kb = acts[0].len();
    for (i, y) in out.iter_mut().enumerate() {
        let p = w.as_ptr().add((row0 + i) * rb);
        let mut acc = [_mm256_setzero_ps(); TILE];
        let mut mins = _mm_setzero_ps();
        for k in 0..kb {
            let b = p.add(k * 24);
            let dm = f16x2(b);
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            let q = q5_1_quants(b.add(4));
            let (a, s) = tile_scales(&acts, k);
            for j in 0..TILE {
                let sc = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_set1_ps(a[j].d));
                acc[j] = _mm256_fmadd_ps(sc, D::dot_us(q, acts_q(a[j])), acc[j]);
            }
            mins = _mm_add_ps(mins, _mm_mul_ps(_mm_set1_ps(m), s));
        }
        let mut m4 = [0f32; TILE];
        _mm_storeu_ps(m4.as_mut_ptr(), mins);
        for j in 0..TILE {
            y[j] = hsum(acc[j]) + m4[j];
        }
    }
}
