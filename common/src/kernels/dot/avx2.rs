//! The AVX2 (and AVX-VNNI) row and tile kernels of the 32-block formats: llama.cpp's integer
//! schemes, with the 5-bit formats in [`super::avx2_q5`].

use std::arch::x86_64::*;

use super::avx2_q5::{q5_0_rows, q5_0_tile_rows, q5_1_rows, q5_1_tile_rows};
use super::{ActBlock, TILE};

fn check(w: &[u8], row_bytes: usize, acts: &[ActBlock], out: &[f32], row0: usize, bb: usize) {
    assert!(row_bytes >= acts.len() * bb);
    assert!(w.len() >= (row0 + out.len()) * row_bytes);
}

pub(crate) fn check_tile(
    w: &[u8],
    rb: usize,
    a: &[&[ActBlock]; TILE],
    o: &[[f32; TILE]],
    r0: usize,
    bb: usize,
) {
    let kb = a[0].len();
    assert!(a.iter().all(|t| t.len() == kb));
    assert!(rb >= kb * bb);
    assert!(w.len() >= (r0 + o.len()) * rb);
}

/// How 32 (unsigned byte × signed byte) products become 8 lane sums of 4, as f32: with
/// `maddubs` + `madd` (AVX2) or with one `vpdpbusd` (AVX-VNNI). Both give the same
/// integers (no product pair here reaches the i16 saturation of `maddubs`), so the
/// kernels give the same bits either way.
pub(crate) trait Dot {
    /// Σ (unsigned a[i] · signed b[i]) over each group of 4 bytes.
    unsafe fn dot_us(a: __m256i, b: __m256i) -> __m256;
}

/// AVX2 only.
pub(crate) struct Plain;
/// AVX-VNNI.
pub(crate) struct Vnni;
/// AVX-512 VNNI on 256-bit registers (AVX-512VL): the same `vpdpbusd`, EVEX-encoded, on
/// CPUs with AVX-512 but without AVX-VNNI (AMD Zen 4, Intel Ice Lake and Sapphire Rapids
/// servers); llama.cpp takes it there.
pub(crate) struct Vnni512;

impl Dot for Plain {
    #[inline(always)]
    unsafe fn dot_us(a: __m256i, b: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(a, b);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }
}

impl Dot for Vnni {
    #[inline(always)]
    unsafe fn dot_us(a: __m256i, b: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b))
    }
}

impl Dot for Vnni512 {
    #[inline(always)]
    unsafe fn dot_us(a: __m256i, b: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b))
    }
}

// Safe entry points, one set per instruction set: `best` and `best_tile` hand these out
// only after detecting the features, and the bounds are checked here once per call.
macro_rules! entry_points {
    ($mod:ident, $isa:ty, $features:literal) => {
        pub mod $mod {
            use super::*;

            macro_rules! rows_entry {
                ($name:ident, $kernel:ident, $bb:literal) => {
                    pub fn $name(w: &[u8], rb: usize, a: &[ActBlock], o: &mut [f32], r0: usize) {
                        #[target_feature(enable = $features)]
                        unsafe fn k(w: &[u8], rb: usize, a: &[ActBlock], o: &mut [f32], r0: usize) {
                            $kernel::<$isa>(w, rb, a, o, r0)
                        }
                        check(w, rb, a, o, r0, $bb);
                        // SAFETY: features detected by `best`; reads within the checked bounds.
                        unsafe { k(w, rb, a, o, r0) }
                    }
                };
            }
            macro_rules! tile_entry {
                ($name:ident, $kernel:ident, $bb:literal) => {
                    pub fn $name(
                        w: &[u8],
                        rb: usize,
                        a: [&[ActBlock]; TILE],
                        o: &mut [[f32; TILE]],
                        r0: usize,
                    ) {
                        #[target_feature(enable = $features)]
                        unsafe fn k(
                            w: &[u8],
                            rb: usize,
                            a: [&[ActBlock]; TILE],
                            o: &mut [[f32; TILE]],
                            r0: usize,
                        ) {
                            $kernel::<$isa>(w, rb, a, o, r0)
                        }
                        check_tile(w, rb, &a, o, r0, $bb);
                        // SAFETY: features detected by `best_tile`; reads within the
                        // checked bounds.
                        unsafe { k(w, rb, a, o, r0) }
                    }
                };
            }
            rows_entry!(q4_0, q4_0_rows, 18);
            rows_entry!(q4_1, q4_1_rows, 20);
            rows_entry!(q8_0, q8_0_rows, 34);
            rows_entry!(q5_0, q5_0_rows, 22);
            rows_entry!(q5_1, q5_1_rows, 24);
            tile_entry!(q4_1_tile, q4_1_tile_rows, 20);
            tile_entry!(q8_0_tile, q8_0_tile_rows, 34);
            tile_entry!(q5_0_tile, q5_0_tile_rows, 22);
            tile_entry!(q5_1_tile, q5_1_tile_rows, 24);
        }
    };
}
entry_points!(plain, Plain, "avx2,fma,f16c");
entry_points!(vnni, Vnni, "avx2,fma,f16c,avxvnni");
entry_points!(vnni512, Vnni512, "avx2,fma,f16c,avx512vnni,avx512vl");

/// Horizontal sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Two adjacent f16 at `p` as f32 lanes 0 and 1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16x2(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)))
}

/// 16 bytes of packed nibbles -> 32 bytes: low nibbles in lanes 0..16, high in 16..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    let t = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Σ (signed a[i] * signed b[i]) as 8 f32 lanes.
#[inline(always)]
pub(super) unsafe fn dot_ss<D: Dot>(a: __m256i, b: __m256i) -> __m256 {
    D::dot_us(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn acts_q(a: &ActBlock) -> __m256i {
    _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i)
}

/// One Q4_1 block's contribution: `acc += d·ad · Σ q·qa`, and `m·s` returned.
#[inline(always)]
unsafe fn q4_1_block<D: Dot>(b: *const u8, a: &ActBlock, qa: __m256i, acc: &mut __m256) -> f32 {
    let dm = f16x2(b);
    let d = _mm_cvtss_f32(dm);
    let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
    let s = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_set1_ps(a.d));
    *acc = _mm256_fmadd_ps(s, D::dot_us(nibbles(b.add(4)), qa), *acc);
    m * a.s
}

// Per row: one accumulator, blocks in order, and the min term summed in scalar f32, the
// same order of operations as llama.cpp's AVX2 kernel, so both engines get identical
// sums. Two rows run interleaved to hide the FMA latency without changing that order.
#[inline(always)]
unsafe fn q4_1_rows<D: Dot>(w: &[u8], rb: usize, acts: &[ActBlock], out: &mut [f32], row0: usize) {
    pair_rows::<true>(w, rb, acts, out, row0, 20, |b, a, qa, acc| {
        q4_1_block::<D>(b, a, qa, acc)
    });
}

#[inline(always)]
unsafe fn q4_0_rows<D: Dot>(w: &[u8], rb: usize, acts: &[ActBlock], out: &mut [f32], row0: usize) {
    for (i, y) in out.iter_mut().enumerate() {
        let p = w.as_ptr().add((row0 + i) * rb);
        let mut acc = _mm256_setzero_ps();
        for (k, a) in acts.iter().enumerate() {
            let b = p.add(k * 18);
            prefetch_ahead(b, 0);
            let d = _mm_cvtss_f32(f16x2(b));
            let qx = _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), dot_ss::<D>(qx, acts_q(a)), acc);
        }
        *y = hsum(acc);
    }
}

/// Bytes ahead of the current position that the row kernels ask the cache for. With short
/// rows (the 640-wide head of Gemma 3: 20 blocks) the loads stalled on memory: the kernel
/// read 13.7 GB/s where a plain sum over the same bytes reads 55.
const PREFETCH_AHEAD: usize = 4096;

/// Asks for the cache line `PREFETCH_AHEAD` bytes past `p + at` (a hint: it never faults).
#[inline(always)]
pub(crate) unsafe fn prefetch_ahead(p: *const u8, at: usize) {
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at + PREFETCH_AHEAD) as *const i8);
}

/// The row kernel of a 32-value block format, two rows at a time: `block(b, a, qa, acc)` adds
/// one block's `d·ad·Σ q·qa` to `acc` and returns its min term (`m·s`, for the formats with a
/// min: `MIN`), which is summed apart and added after the horizontal sum, in llama.cpp's
/// order. `bb` is the block's bytes.
#[inline(always)]
pub(crate) unsafe fn pair_rows<const MIN: bool>(
    w: &[u8],
    rb: usize,
    acts: &[ActBlock],
    out: &mut [f32],
    row0: usize,
    bb: usize,
    block: impl Fn(*const u8, &ActBlock, __m256i, &mut __m256) -> f32,
) {
    let finish = |acc: __m256, mins: f32| if MIN { hsum(acc) + mins } else { hsum(acc) };
    let mut pairs = out.chunks_exact_mut(2);
    let mut r = row0;
    for pair in &mut pairs {
        let (p0, p1) = (w.as_ptr().add(r * rb), w.as_ptr().add((r + 1) * rb));
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut mins0, mut mins1) = (0f32, 0f32);
        for (k, a) in acts.iter().enumerate() {
            prefetch_ahead(p0, k * 2 * bb);
            let qa = acts_q(a);
            mins0 += block(p0.add(k * bb), a, qa, &mut acc0);
            mins1 += block(p1.add(k * bb), a, qa, &mut acc1);
        }
        pair[0] = finish(acc0, mins0);
        pair[1] = finish(acc1, mins1);
        r += 2;
    }
    for y in pairs.into_remainder() {
        let p = w.as_ptr().add(r * rb);
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (k, a) in acts.iter().enumerate() {
            mins += block(p.add(k * bb), a, acts_q(a), &mut acc);
        }
        *y = finish(acc, mins);
    }
}

#[inline(always)]
unsafe fn q8_0_block<D: Dot>(b: *const u8, a: &ActBlock, qa: __m256i, acc: &mut __m256) {
    let d = _mm256_set1_ps(_mm_cvtss_f32(f16x2(b)) * a.d);
    let q = _mm256_loadu_si256(b.add(2) as *const __m256i);
    *acc = _mm256_fmadd_ps(d, dot_ss::<D>(q, qa), *acc);
}

#[inline(always)]
unsafe fn q8_0_rows<D: Dot>(w: &[u8], rb: usize, acts: &[ActBlock], out: &mut [f32], row0: usize) {
    pair_rows::<false>(w, rb, acts, out, row0, 34, |b, a, qa, acc| {
        q8_0_block::<D>(b, a, qa, acc);
        0.0
    });
}

/// The 4 tokens' scales `d` and min terms `s` of block `k`.
#[inline(always)]
pub(super) unsafe fn tile_scales<'a>(
    acts: &[&'a [ActBlock]; TILE],
    k: usize,
) -> ([&'a ActBlock; TILE], __m128) {
    let a = [
        acts[0].get_unchecked(k),
        acts[1].get_unchecked(k),
        acts[2].get_unchecked(k),
        acts[3].get_unchecked(k),
    ];
    (a, _mm_setr_ps(a[0].s, a[1].s, a[2].s, a[3].s))
}

// A Q4_1 tile: per row and token, one vector accumulator over the blocks in order plus
// the min term summed in f32 (four tokens' min terms side by side in one vector: lane j
// computes exactly `mins += m * s_j`), the order of `q4_1_rows`.
#[inline(always)]
unsafe fn q4_1_tile_rows<D: Dot>(
    w: &[u8],
    rb: usize,
    acts: [&[ActBlock]; TILE],
    out: &mut [[f32; TILE]],
    row0: usize,
) {
    let kb = acts[0].len();
    // Two rows at a time share the activations' loads; a last odd row runs alone.
    let mut pairs = out.chunks_exact_mut(2);
    let mut r = row0;
    for pair in &mut pairs {
        let (p0, p1) = (w.as_ptr().add(r * rb), w.as_ptr().add((r + 1) * rb));
        let mut acc0 = [_mm256_setzero_ps(); TILE];
        let mut acc1 = [_mm256_setzero_ps(); TILE];
        let (mut mins0, mut mins1) = (_mm_setzero_ps(), _mm_setzero_ps());
        for k in 0..kb {
            let (b0, b1) = (p0.add(k * 20), p1.add(k * 20));
            let (dm0, dm1) = (f16x2(b0), f16x2(b1));
            let (d0, d1) = (_mm_cvtss_f32(dm0), _mm_cvtss_f32(dm1));
            let (q0, q1) = (nibbles(b0.add(4)), nibbles(b1.add(4)));
            let (a, s) = tile_scales(&acts, k);
            for j in 0..TILE {
                let qa = acts_q(a[j]);
                let ad = _mm256_set1_ps(a[j].d);
                let sc0 = _mm256_mul_ps(_mm256_set1_ps(d0), ad);
                let sc1 = _mm256_mul_ps(_mm256_set1_ps(d1), ad);
                acc0[j] = _mm256_fmadd_ps(sc0, D::dot_us(q0, qa), acc0[j]);
                acc1[j] = _mm256_fmadd_ps(sc1, D::dot_us(q1, qa), acc1[j]);
            }
            let m0 = _mm_cvtss_f32(_mm_movehdup_ps(dm0));
            let m1 = _mm_cvtss_f32(_mm_movehdup_ps(dm1));
            mins0 = _mm_add_ps(mins0, _mm_mul_ps(_mm_set1_ps(m0), s));
            mins1 = _mm_add_ps(mins1, _mm_mul_ps(_mm_set1_ps(m1), s));
        }
        for (y, (acc, mins)) in pair.iter_mut().zip([(acc0, mins0), (acc1, mins1)]) {
            let mut m4 = [0f32; TILE];
            _mm_storeu_ps(m4.as_mut_ptr(), mins);
            for j in 0..TILE {
                y[j] = hsum(acc[j]) + m4[j];
            }
        }
        r += 2;
    }
    for y in pairs.into_remainder() {
        let p = w.as_ptr().add(r * rb);
        let mut acc = [_mm256_setzero_ps(); TILE];
        let mut mins = _mm_setzero_ps();
        for k in 0..kb {
            let b = p.add(k * 20);
            let dm = f16x2(b);
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            let q = nibbles(b.add(4));
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

// A Q8_0 tile, in the order of `q8_0_rows`.
#[inline(always)]
unsafe fn q8_0_tile_rows<D: Dot>(
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
            let b = p.add(k * 34);
            let d = _mm_cvtss_f32(f16x2(b));
            let q = _mm256_loadu_si256(b.add(2) as *const __m256i);
            let qa = _mm256_sign_epi8(q, q);
            let (a, _) = tile_scales(&acts, k);
            for j in 0..TILE {
                let sc = _mm256_set1_ps(d * a[j].d);
                let x = _mm256_sign_epi8(acts_q(a[j]), q);
                acc[j] = _mm256_fmadd_ps(sc, D::dot_us(qa, x), acc[j]);
            }
        }
        for j in 0..TILE {
            y[j] = hsum(acc[j]);
        }
    }
}
