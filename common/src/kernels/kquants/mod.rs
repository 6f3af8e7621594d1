//! The K-quants Q4_K, Q5_K and Q6_K: super-blocks of 256 weights, dotted with activations
//! quantized to Q8_K blocks of 256.
//!
//! Everything follows llama.cpp: the activations are quantized as `quantize_row_q8_K_ref`
//! does, and each super-block's integer products are formed and assembled in f32 in the order
//! of its AVX2 `ggml_vec_dot_q{4,5,6}_K_q8_K`, so that both engines get the same bits. The
//! scalar reference [`dot_scalar`] forms the AVX2 kernels' eight lane sums itself and
//! performs the very same float operations, so every path here equals it bit for bit.
//!
//! - this file: the scalar reference and dispatch.
//! - `q8k`: the Q8_K activations and their quantization.
//! - `avx2`: the AVX2 row and 4-token tile kernels.
//! - `avx512`: the AVX-512 8-token tiles.
#![allow(unsafe_code)]

use super::avx512::Tile8Fn;
use super::blocks::{f16_at, QuantKind};
use super::dot::{RowsFn, TileFn};

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
pub(crate) mod avx512;
mod q8k;
#[cfg(test)]
mod tests;

pub use q8k::{quantize_acts_k, quantize_acts_k_scalar, ActBlockK};

/// Weights per super-block, and activations per Q8_K block.
pub const QK_K: usize = 256;

/// The eight 6-bit scales and eight 6-bit mins packed in a Q4_K/Q5_K super-block's 12 bytes
/// (llama.cpp's `get_scale_min_k4` for `j` in 0..8).
pub fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, m)
}

/// Value `i` (0..32) of the 32-value chunk `c` (0..8) of a Q4_K/Q5_K super-block: the low
/// nibbles of `qs[32·(c/2)..]` for even chunks, the high for odd, plus 16 where bit `c` of
/// `qh[i]` is set (Q5_K).
#[inline(always)]
fn q45_value(qs: &[u8], qh: Option<&[u8]>, c: usize, i: usize) -> i32 {
    let byte = qs[32 * (c / 2) + i];
    let nibble = if c.is_multiple_of(2) {
        byte & 0xF
    } else {
        byte >> 4
    };
    let high = qh.map_or(0, |h| ((h[i] >> c) & 1) << 4);
    i32::from(nibble | high)
}

/// Value `v` (0..256) of a Q6_K super-block, in 0..64 (the stored `q`, before `- 32`).
#[inline(always)]
fn q6_value(b: &[u8], v: usize) -> i32 {
    let (half, chunk, i) = (v / 128, (v % 128) / 32, v % 32);
    let ql = b[64 * half + 32 * (chunk % 2) + i];
    let low = if chunk < 2 { ql & 0xF } else { ql >> 4 };
    let high = (b[128 + 32 * half + i] >> (2 * chunk)) & 3;
    i32::from(low | (high << 4))
}

/// Dequantizes one super-block of `kind` into 256 values (llama.cpp's `dequantize_row_*`).
pub fn dequantize_block(kind: QuantKind, b: &[u8], out: &mut [f32]) {
    match kind {
        QuantKind::Q4K | QuantKind::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, m) = scales_mins(&b[4..16]);
            let (qh, qs) = match kind {
                QuantKind::Q5K => (Some(&b[16..48]), &b[48..176]),
                _ => (None, &b[16..144]),
            };
            for (c, o) in out.chunks_exact_mut(32).enumerate() {
                let (dl, ml) = (d * f32::from(sc[c]), dmin * f32::from(m[c]));
                for (i, y) in o.iter_mut().enumerate() {
                    *y = dl * q45_value(qs, qh, c, i) as f32 - ml;
                }
            }
        }
        QuantKind::Q6K => {
            let d = f16_at(b, 208);
            for (v, y) in out.iter_mut().enumerate().take(QK_K) {
                let sc = f32::from(b[192 + v / 16] as i8);
                *y = d * sc * (q6_value(b, v) - 32) as f32;
            }
        }
        _ => panic!("{kind:?} is not a K-quant"),
    }
}

/// The integer parts of one super-block against one Q8_K block, as llama.cpp's AVX2 kernels
/// form them: `lanes[l]` is the sum, over the super-block's 32-value chunks, of each chunk's
/// values `4l..4l + 4` times their activations and scales (the i32 lanes of `madd(scale,
/// maddubs(q, q8))`); `mins[i]` is `m[2i]·(bsums[4i] + bsums[4i+1]) + m[2i+1]·(bsums[4i+2] +
/// bsums[4i+3])` (the lanes of `madd(mins, hadd(bsums))`; zero for Q6_K, whose `- 32` is in
/// the lanes).
pub fn block_ints(kind: QuantKind, b: &[u8], a: &ActBlockK) -> ([i32; 8], [i32; 4]) {
    let mut lanes = [0i32; 8];
    let mut mins = [0i32; 4];
    match kind {
        QuantKind::Q4K | QuantKind::Q5K => {
            let (sc, m) = scales_mins(&b[4..16]);
            let (qh, qs) = match kind {
                QuantKind::Q5K => (Some(&b[16..48]), &b[48..176]),
                _ => (None, &b[16..144]),
            };
            for (c, &s) in sc.iter().enumerate() {
                for i in 0..32 {
                    let p = q45_value(qs, qh, c, i) * i32::from(a.qs[32 * c + i]);
                    lanes[i / 4] += i32::from(s) * p;
                }
            }
            for (i, y) in mins.iter_mut().enumerate() {
                let pair = |g: usize| i32::from(a.bsums[g]) + i32::from(a.bsums[g + 1]);
                *y = i32::from(m[2 * i]) * pair(4 * i) + i32::from(m[2 * i + 1]) * pair(4 * i + 2);
            }
        }
        QuantKind::Q6K => {
            for v in 0..QK_K {
                let sc = i32::from(b[192 + v / 16] as i8);
                lanes[(v % 32) / 4] += sc * (q6_value(b, v) - 32) * i32::from(a.qs[v]);
            }
        }
        _ => panic!("{kind:?} is not a K-quant"),
    }
    (lanes, mins)
}

/// Eight lanes summed as the AVX2 kernels' horizontal sum does (`hsum_float_8`).
#[inline(always)]
fn hsum8(v: [f32; 8]) -> f32 {
    let s = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

/// Scalar reference for the K-quants: [`block_ints`] per super-block, assembled with exactly
/// the float operations of llama.cpp's AVX2 kernels. Per super-block `d = ad · d` and
/// `dmin = -ad · dmin`; eight f32 lanes `acc[l] = fma(d, lanes[l], acc[l])`, summed at the end
/// as `hsum8` does; the min terms in four lanes `fma(dmin, mins[i], ·)` summed as
/// `(0 + 2) + (1 + 3)` (Q4_K), or in one scalar `fma(dmin, Σ mins, ·)` (Q5_K: GCC and clang
/// both contract llama.cpp's `summs += dmin * Σ` on FMA targets).
///
/// # Panics
/// For a kind that is not a K-quant.
pub fn dot_scalar(kind: QuantKind, row: &[u8], acts: &[ActBlockK]) -> f32 {
    let mut acc = [0f32; 8];
    let mut acc_m = [0f32; 4];
    let mut summs = 0f32;
    for (b, a) in row.chunks_exact(kind.block_bytes()).zip(acts) {
        let (lanes, mins) = block_ints(kind, b, a);
        let d_at = if kind == QuantKind::Q6K { 208 } else { 0 };
        let d = a.d * f16_at(b, d_at);
        match kind {
            QuantKind::Q4K => {
                let dmin = -a.d * f16_at(b, 2);
                for (y, &p) in acc_m.iter_mut().zip(&mins) {
                    *y = dmin.mul_add(p as f32, *y);
                }
            }
            QuantKind::Q5K => {
                let dmin = -a.d * f16_at(b, 2);
                summs = dmin.mul_add(mins.iter().sum::<i32>() as f32, summs);
            }
            _ => {}
        }
        for (y, &l) in acc.iter_mut().zip(&lanes) {
            *y = d.mul_add(l as f32, *y);
        }
    }
    match kind {
        QuantKind::Q4K => hsum8(acc) + ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3])),
        QuantKind::Q5K => hsum8(acc) + summs,
        _ => hsum8(acc),
    }
}

fn rows_scalar(
    kind: QuantKind,
    w: &[u8],
    row_bytes: usize,
    acts: &[ActBlockK],
    out: &mut [f32],
    row0: usize,
) {
    for (i, y) in out.iter_mut().enumerate() {
        let r = row0 + i;
        *y = dot_scalar(kind, &w[r * row_bytes..(r + 1) * row_bytes], acts);
    }
}

fn scalar_q4_k(w: &[u8], rb: usize, a: &[ActBlockK], o: &mut [f32], r0: usize) {
    rows_scalar(QuantKind::Q4K, w, rb, a, o, r0)
}
fn scalar_q5_k(w: &[u8], rb: usize, a: &[ActBlockK], o: &mut [f32], r0: usize) {
    rows_scalar(QuantKind::Q5K, w, rb, a, o, r0)
}
fn scalar_q6_k(w: &[u8], rb: usize, a: &[ActBlockK], o: &mut [f32], r0: usize) {
    rows_scalar(QuantKind::Q6K, w, rb, a, o, r0)
}

fn not_k(kind: QuantKind) -> ! {
    panic!("{kind:?} is not a K-quant: see kernels::dot")
}

/// The scalar row kernel (the reference in tests).
///
/// # Panics
/// For a kind that is not a K-quant.
pub fn scalar(kind: QuantKind) -> RowsFn<ActBlockK> {
    match kind {
        QuantKind::Q4K => scalar_q4_k,
        QuantKind::Q5K => scalar_q5_k,
        QuantKind::Q6K => scalar_q6_k,
        _ => not_k(kind),
    }
}

/// The fastest row kernel this CPU supports for `kind`.
///
/// # Panics
/// For a kind that is not a K-quant.
pub fn best(kind: QuantKind) -> RowsFn<ActBlockK> {
    #[cfg(target_arch = "x86_64")]
    if super::dot::has_avx2() {
        return match kind {
            QuantKind::Q4K => avx2::q4_k,
            QuantKind::Q5K => avx2::q5_k,
            QuantKind::Q6K => avx2::q6_k,
            _ => not_k(kind),
        };
    }
    scalar(kind)
}

/// The 4-token tile kernel for `kind`, where one exists for this CPU.
///
/// # Panics
/// For a kind that is not a K-quant.
pub fn best_tile(kind: QuantKind) -> Option<TileFn<ActBlockK>> {
    #[cfg(target_arch = "x86_64")]
    if super::dot::has_avx2() {
        return Some(match kind {
            QuantKind::Q4K => avx2::q4_k_tile,
            QuantKind::Q5K => avx2::q5_k_tile,
            QuantKind::Q6K => avx2::q6_k_tile,
            _ => not_k(kind),
        });
    }
    let _ = kind;
    None
}

/// The 8-token tile kernel for `kind`, where the CPU has AVX-512 ([`super::avx512::TILE8`] tokens).
///
/// # Panics
/// For a kind that is not a K-quant.
pub fn best_tile8(kind: QuantKind) -> Option<Tile8Fn<ActBlockK>> {
    avx512::tile8(kind)
}
