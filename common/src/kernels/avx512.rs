//! AVX-512 tile kernels: two weight rows side by side in one 512-bit register.
//!
//! The batched paths (prefill, and decode steps of several sessions) spend most of their time
//! in the tile kernels of [`super::dot`]. Here each 512-bit register holds the same block of
//! two weight rows (row `r` in lanes 0..8, row `r + 1` in lanes 8..16), and each token's
//! activation block is broadcast to both halves, so one `vpdpbusd`, one conversion, one
//! scale and one FMA serve two rows. Every lane runs exactly the operations of the 256-bit
//! kernel in the same order, and each half is summed the same way, so the results are bit for
//! bit those of [`super::dot::best_tile`]'s AVX2 kernels (tested below).
#![allow(unsafe_code)]

use std::sync::OnceLock;

use super::blocks::{ActBlock, QuantKind};
use super::dot::{TileFn, TILE};

/// Tokens per tile of [`Tile8Fn`].
pub const TILE8: usize = 8;

/// A [`TileFn`] over [`TILE8`] tokens: each weight block is unpacked once for twice as many
/// tokens, and each (row, token) sum is still formed in the order of the one-token kernel.
pub type Tile8Fn<A = ActBlock> = fn(&[u8], usize, [&[A]; TILE8], &mut [[f32; TILE8]], usize);

/// Whether these kernels can run here.
pub fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            super::dot::has_avx2()
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// The 8-token AVX-512 tile kernel for Q4_1, Q5_0, Q5_1 or Q8_0, where the CPU has it (the
/// K-quants' are in [`super::kquants`]).
pub fn tile8(kind: QuantKind) -> Option<Tile8Fn> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        return match kind {
            QuantKind::Q4_1 => Some(x86::q4_1_tile8),
            QuantKind::Q8_0 => Some(x86::q8_0_tile8),
            QuantKind::Q5_0 => Some(x86::q5_0_tile8),
            QuantKind::Q5_1 => Some(x86::q5_1_tile8),
            _ => None,
        };
    }
    let _ = kind;
    None
}

/// The AVX-512 tile kernel for Q4_1, Q5_0, Q5_1 or Q8_0, where the CPU has it.
pub fn tile(kind: QuantKind) -> Option<TileFn> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        return match kind {
            QuantKind::Q4_1 => Some(x86::q4_1_tile),
            QuantKind::Q8_0 => Some(x86::q8_0_tile),
            QuantKind::Q5_0 => Some(x86::q5_0_tile),
            QuantKind::Q5_1 => Some(x86::q5_1_tile),
            _ => None,
        };
    }
    let _ = kind;
    None
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{ActBlock, TileFn, TILE, TILE8};
    use crate::kernels::dot::avx2::{f16x2, hsum, plain, vnni};
    use crate::kernels::dot::has_vnni;

    /// The 256-bit kernels (AVX-VNNI, plain AVX2) for an odd last row.
    type Rest = (TileFn, TileFn);

    /// A kernel over pairs of rows and `N` tokens.
    type Pairs<const N: usize> = unsafe fn(&[u8], usize, [&[ActBlock]; N], &mut [[f32; N]], usize);

    /// Runs `pairs` over the even number of leading rows and the 256-bit kernel over an odd
    /// last one ([`TILE`] tokens at a time), after checking the bounds once.
    #[allow(clippy::too_many_arguments)]
    fn split<const N: usize>(
        pairs: Pairs<N>,
        rest: Rest,
        bb: usize,
        w: &[u8],
        rb: usize,
        a: [&[ActBlock]; N],
        o: &mut [[f32; N]],
        r0: usize,
    ) {
        let kb = a[0].len();
        assert!(a.iter().all(|t| t.len() == kb));
        assert!(rb >= kb * bb);
        assert!(w.len() >= (r0 + o.len()) * rb);
        let even = o.len() / 2 * 2;
        // SAFETY: `tile` and `tile8` hand these kernels out only after detecting the features
        // `pairs` needs; every read is within the bounds checked above.
        unsafe { pairs(w, rb, a, &mut o[..even], r0) };
        if even < o.len() {
            // AVX-512 VNNI does not imply AVX-VNNI (Ice Lake has the one, not the other).
            let rest = if has_vnni() { rest.0 } else { rest.1 };
            for t in (0..N).step_by(TILE) {
                let four = [a[t], a[t + 1], a[t + 2], a[t + 3]];
                let mut y = [[0f32; TILE]; 1];
                rest(w, rb, four, &mut y, r0 + even);
                o[even][t..t + TILE].copy_from_slice(&y[0]);
            }
        }
    }

    /// The safe entry point of a pair kernel over `$n` tokens.
    macro_rules! entry {
        ($name:ident, $n:expr, $pairs:ident, $rest:ident, $bb:literal) => {
            pub fn $name(
                w: &[u8],
                rb: usize,
                a: [&[ActBlock]; $n],
                o: &mut [[f32; $n]],
                r0: usize,
            ) {
                split(
                    $pairs::<{ $n }>,
                    (vnni::$rest, plain::$rest),
                    $bb,
                    w,
                    rb,
                    a,
                    o,
                    r0,
                )
            }
        };
    }
    entry!(q4_1_tile, TILE, q4_1_pairs, q4_1_tile, 20);
    entry!(q8_0_tile, TILE, q8_0_pairs, q8_0_tile, 34);
    entry!(q4_1_tile8, TILE8, q4_1_pairs, q4_1_tile, 20);
    entry!(q8_0_tile8, TILE8, q8_0_pairs, q8_0_tile, 34);
    entry!(q5_0_tile, TILE, q5_0_pairs, q5_0_tile, 22);
    entry!(q5_1_tile, TILE, q5_1_pairs, q5_1_tile, 24);
    entry!(q5_0_tile8, TILE8, q5_0_pairs, q5_0_tile, 22);
    entry!(q5_1_tile8, TILE8, q5_1_pairs, q5_1_tile, 24);

    /// Lanes 0..8 and 8..16 summed separately, each as [`hsum`] sums 8 lanes.
    #[inline(always)]
    unsafe fn halves(v: __m512) -> (f32, f32) {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        (hsum(lo), hsum(hi))
    }

    /// Two rows' 16 bytes of packed nibbles -> one register: row 0's low nibbles, its high
    /// nibbles, row 1's low, row 1's high (32 bytes per row, the 256-bit kernel's order).
    #[inline(always)]
    unsafe fn nibbles2(p0: *const u8, p1: *const u8) -> __m512i {
        let t0 = _mm_loadu_si128(p0 as *const __m128i);
        let t1 = _mm_loadu_si128(p1 as *const __m128i);
        let r0 = _mm256_inserti128_si256(_mm256_castsi128_si256(t0), _mm_srli_epi16(t0, 4), 1);
        let r1 = _mm256_inserti128_si256(_mm256_castsi128_si256(t1), _mm_srli_epi16(t1, 4), 1);
        let both = _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1);
        _mm512_and_si512(both, _mm512_set1_epi8(0x0F))
    }

    /// One token's 32 activation bytes in both halves.
    #[inline(always)]
    unsafe fn acts2(a: &ActBlock) -> __m512i {
        _mm512_broadcast_i64x4(_mm256_loadu_si256(a.qs.as_ptr() as *const __m256i))
    }

    /// `x` in lanes 0..8, `y` in lanes 8..16.
    #[inline(always)]
    unsafe fn two(x: f32, y: f32) -> __m512 {
        _mm512_castsi512_ps(_mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_castps_si256(_mm256_set1_ps(x))),
            _mm256_castps_si256(_mm256_set1_ps(y)),
            1,
        ))
    }

    /// Block `k` of each of the `N` tokens.
    #[inline(always)]
    unsafe fn blocks_at<'a, const N: usize>(
        acts: &[&'a [ActBlock]; N],
        k: usize,
    ) -> [&'a ActBlock; N] {
        std::array::from_fn(|j| acts[j].get_unchecked(k))
    }

    // Per row and token: one accumulator over the blocks in order, `acc += (d · ad) · Σ q·qa`,
    // and the min term `mins += m · s` in f32, as `q4_1_tile_rows` does. The min terms of
    // both rows sit in one register: token j of row 0 in lane j, of row 1 in lane 8 + j.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q4_1_pairs<const N: usize>(
        w: &[u8],
        rb: usize,
        acts: [&[ActBlock]; N],
        out: &mut [[f32; N]],
        row0: usize,
    ) {
        let kb = acts[0].len();
        let mut r = row0;
        for pair in out.chunks_exact_mut(2) {
            let (p0, p1) = (w.as_ptr().add(r * rb), w.as_ptr().add((r + 1) * rb));
            let mut acc = [_mm512_setzero_ps(); N];
            let mut mins = _mm512_setzero_ps();
            for k in 0..kb {
                let (b0, b1) = (p0.add(k * 20), p1.add(k * 20));
                let (dm0, dm1) = (f16x2(b0), f16x2(b1));
                let d = two(_mm_cvtss_f32(dm0), _mm_cvtss_f32(dm1));
                let m = two(
                    _mm_cvtss_f32(_mm_movehdup_ps(dm0)),
                    _mm_cvtss_f32(_mm_movehdup_ps(dm1)),
                );
                let q = nibbles2(b0.add(4), b1.add(4));
                let a = blocks_at(&acts, k);
                let mut s = [0f32; 16];
                for j in 0..N {
                    let sc = _mm512_mul_ps(d, _mm512_set1_ps(a[j].d));
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, acts2(a[j]));
                    acc[j] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(dot), acc[j]);
                    s[j] = a[j].s;
                    s[8 + j] = a[j].s;
                }
                mins = _mm512_add_ps(mins, _mm512_mul_ps(m, _mm512_loadu_ps(s.as_ptr())));
            }
            let mut n = [0f32; 16];
            _mm512_storeu_ps(n.as_mut_ptr(), mins);
            for j in 0..N {
                let (s0, s1) = halves(acc[j]);
                pair[0][j] = s0 + n[j];
                pair[1][j] = s1 + n[8 + j];
            }
            r += 2;
        }
    }

    // Per row and token: `acc += (d · ad) · Σ q·qa` over the blocks in order, as
    // `q8_0_tile_rows` does. Signed × signed goes through `|q|` and `qa` negated where `q` is
    // negative, the integers of `_mm256_sign_epi8` in the 256-bit kernel. The scale is one
    // vector product per token, the same f32 product as the 256-bit kernel's scalar one.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q8_0_pairs<const N: usize>(
        w: &[u8],
        rb: usize,
        acts: [&[ActBlock]; N],
        out: &mut [[f32; N]],
        row0: usize,
    ) {
        let kb = acts[0].len();
        let mut r = row0;
        for pair in out.chunks_exact_mut(2) {
            let (p0, p1) = (w.as_ptr().add(r * rb), w.as_ptr().add((r + 1) * rb));
            let mut acc = [_mm512_setzero_ps(); N];
            for k in 0..kb {
                let (b0, b1) = (p0.add(k * 34), p1.add(k * 34));
                let d = two(_mm_cvtss_f32(f16x2(b0)), _mm_cvtss_f32(f16x2(b1)));
                let q = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(2) as *const __m256i)),
                    _mm256_loadu_si256(b1.add(2) as *const __m256i),
                    1,
                );
                let neg = _mm512_movepi8_mask(q);
                let qabs = _mm512_abs_epi8(q);
                let a = blocks_at(&acts, k);
                for j in 0..N {
                    let x = acts2(a[j]);
                    let x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
                    let sc = _mm512_mul_ps(d, _mm512_set1_ps(a[j].d));
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qabs, x);
                    acc[j] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(dot), acc[j]);
                }
            }
            for j in 0..N {
                let (s0, s1) = halves(acc[j]);
                pair[0][j] = s0;
                pair[1][j] = s1;
            }
            r += 2;
        }
    }

    /// The fifth bits of two 5-bit blocks (`qh` at `h0` and `h1`) as a byte mask over
    /// [`nibbles2`]'s lanes: row 0's values in bits 0..32, row 1's in 32..64.
    #[inline(always)]
    unsafe fn fifth_bits(h0: *const u8, h1: *const u8) -> __mmask64 {
        let lo = std::ptr::read_unaligned(h0 as *const u32);
        let hi = std::ptr::read_unaligned(h1 as *const u32);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    // Q5_0 as `q8_0_pairs`, with the values `q - 16` built from the nibbles and the fifth bits:
    // negative exactly where the fifth bit is clear, so that mask signs the activations.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q5_0_pairs<const N: usize>(
        w: &[u8],
        rb: usize,
        acts: [&[ActBlock]; N],
        out: &mut [[f32; N]],
        row0: usize,
    ) {
        let kb = acts[0].len();
        let sixteen = _mm512_set1_epi8(16);
        let mut r = row0;
        for pair in out.chunks_exact_mut(2) {
            let (p0, p1) = (w.as_ptr().add(r * rb), w.as_ptr().add((r + 1) * rb));
            let mut acc = [_mm512_setzero_ps(); N];
            for k in 0..kb {
                let (b0, b1) = (p0.add(k * 22), p1.add(k * 22));
                let d = two(_mm_cvtss_f32(f16x2(b0)), _mm_cvtss_f32(f16x2(b1)));
                let neg = !fifth_bits(b0.add(2), b1.add(2));
                let q = nibbles2(b0.add(6), b1.add(6));
                let qabs = _mm512_abs_epi8(_mm512_mask_sub_epi8(q, neg, q, sixteen));
                let a = blocks_at(&acts, k);
                for j in 0..N {
                    let x = acts2(a[j]);
                    let x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
                    let sc = _mm512_mul_ps(d, _mm512_set1_ps(a[j].d));
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qabs, x);
                    acc[j] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(dot), acc[j]);
                }
            }
            for j in 0..N {
                let (s0, s1) = halves(acc[j]);
                pair[0][j] = s0;
                pair[1][j] = s1;
            }
            r += 2;
        }
    }

    // Q5_1 as `q4_1_pairs`, with 16 added to the nibbles where the fifth bit is set.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q5_1_pairs<const N: usize>(
        w: &[u8],
        rb: usize,
        acts: [&[ActBlock]; N],
        out: &mut [[f32; N]],
        row0: usize,
    ) {
        let kb = acts[0].len();
        let sixteen = _mm512_set1_epi8(16);
        let mut r = row0;
        for pair in out.chunks_exact_mut(2) {
            let (p0, p1) = (w.as_ptr().add(r * rb), w.as_ptr().add((r + 1) * rb));
            let mut acc = [_mm512_setzero_ps(); N];
            let mut mins = _mm512_setzero_ps();
            for k in 0..kb {
                let (b0, b1) = (p0.add(k * 24), p1.add(k * 24));
                let (dm0, dm1) = (f16x2(b0), f16x2(b1));
                let d = two(_mm_cvtss_f32(dm0), _mm_cvtss_f32(dm1));
                let m = two(
                    _mm_cvtss_f32(_mm_movehdup_ps(dm0)),
                    _mm_cvtss_f32(_mm_movehdup_ps(dm1)),
                );
                let high = fifth_bits(b0.add(4), b1.add(4));
                let q = nibbles2(b0.add(8), b1.add(8));
                let q = _mm512_mask_add_epi8(q, high, q, sixteen);
                let a = blocks_at(&acts, k);
                let mut s = [0f32; 16];
                for j in 0..N {
                    let sc = _mm512_mul_ps(d, _mm512_set1_ps(a[j].d));
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, acts2(a[j]));
                    acc[j] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(dot), acc[j]);
                    s[j] = a[j].s;
                    s[8 + j] = a[j].s;
                }
                mins = _mm512_add_ps(mins, _mm512_mul_ps(m, _mm512_loadu_ps(s.as_ptr())));
            }
            let mut n = [0f32; 16];
            _mm512_storeu_ps(n.as_mut_ptr(), mins);
            for j in 0..N {
                let (s0, s1) = halves(acc[j]);
                pair[0][j] = s0 + n[j];
                pair[1][j] = s1 + n[8 + j];
            }
            r += 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::blocks::QuantKind;
    use crate::kernels::dot::avx2;
    use crate::kernels::test_data::{random_acts, random_row};
    use rand::SeedableRng;

    #[test]
    fn avx512_tiles_equal_avx2_tiles_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: nothing to compare");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for (kind, fast, slow) in [
            (
                QuantKind::Q4_1,
                x86::q4_1_tile as TileFn,
                avx2::plain::q4_1_tile as TileFn,
            ),
            (QuantKind::Q8_0, x86::q8_0_tile, avx2::plain::q8_0_tile),
            (QuantKind::Q5_0, x86::q5_0_tile, avx2::plain::q5_0_tile),
            (QuantKind::Q5_1, x86::q5_1_tile, avx2::plain::q5_1_tile),
        ] {
            for (rows, blocks) in [(1usize, 1usize), (6, 18), (7, 24), (16, 3)] {
                let w: Vec<u8> = (0..rows)
                    .flat_map(|_| random_row(kind, blocks, &mut rng))
                    .collect();
                let rb = blocks * kind.block_bytes();
                let acts = random_acts(TILE, blocks, 3.0, &mut rng);
                let t = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
                // From row 1, so an odd count exercises the 256-bit remainder too.
                let n = rows.saturating_sub(1).max(1);
                let r0 = rows - n;
                let (mut a, mut b) = (vec![[0f32; TILE]; n], vec![[0f32; TILE]; n]);
                fast(&w, rb, t, &mut a, r0);
                slow(&w, rb, t, &mut b, r0);
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    for j in 0..TILE {
                        assert_eq!(x[j].to_bits(), y[j].to_bits(), "{kind:?} row {i} token {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn eight_token_tiles_equal_two_four_token_tiles_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: nothing to compare");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (kind, four) in [
            (QuantKind::Q4_1, avx2::plain::q4_1_tile as TileFn),
            (QuantKind::Q8_0, avx2::plain::q8_0_tile),
            (QuantKind::Q5_0, avx2::plain::q5_0_tile),
            (QuantKind::Q5_1, avx2::plain::q5_1_tile),
        ] {
            let eight = tile8(kind).expect("tile8");
            for (rows, blocks) in [(1usize, 1usize), (6, 18), (7, 48), (16, 3)] {
                let w: Vec<u8> = (0..rows)
                    .flat_map(|_| random_row(kind, blocks, &mut rng))
                    .collect();
                let rb = blocks * kind.block_bytes();
                let acts = random_acts(TILE8, blocks, 3.0, &mut rng);
                let t: [&[ActBlock]; TILE8] = std::array::from_fn(|j| &acts[j][..]);
                let n = rows.saturating_sub(1).max(1);
                let r0 = rows - n;
                let mut a = vec![[0f32; TILE8]; n];
                eight(&w, rb, t, &mut a, r0);
                for half in 0..2 {
                    let mut b = vec![[0f32; TILE]; n];
                    let q = [
                        t[4 * half],
                        t[4 * half + 1],
                        t[4 * half + 2],
                        t[4 * half + 3],
                    ];
                    four(&w, rb, q, &mut b, r0);
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        for j in 0..TILE {
                            assert_eq!(
                                x[4 * half + j].to_bits(),
                                y[j].to_bits(),
                                "{kind:?} rows {rows} row {i} token {}",
                                4 * half + j
                            );
                        }
                    }
                }
            }
        }
    }
}
