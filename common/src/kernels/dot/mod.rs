//! Dot products of one quantized weight row with one row of quantized activations, for the
//! formats of 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against [`ActBlock`]s.
//!
//! `row` holds the raw GGUF blocks of one weight row; `acts` the matching activation blocks.
//! The AVX2 versions are llama.cpp's integer schemes; [`dot_scalar`] is the reference. The
//! K-quants, dotted with Q8_K activations, are in [`super::kquants`]; the kernel types here are
//! generic over the activation block for them.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use super::blocks::{f16_at, q5_quant, u32_at, ActBlock, QuantKind};

/// Scalar reference for every 32-block kind.
///
/// # Panics
/// For a K-quant `kind` (see [`super::kquants::dot_scalar`]).
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
            QuantKind::Q5_0 => {
                let qh = u32_at(b, 2);
                let s: i32 = (0..32)
                    .map(|j| (q5_quant(qh, &b[6..], j) - 16) * i32::from(a.qs[j]))
                    .sum();
                acc += d * a.d * s as f32;
            }
            QuantKind::Q5_1 => {
                let (m, qh) = (f16_at(b, 2), u32_at(b, 4));
                let s: i32 = (0..32)
                    .map(|j| q5_quant(qh, &b[8..], j) * i32::from(a.qs[j]))
                    .sum();
                acc += d * a.d * s as f32 + m * a.s;
            }
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => k_quant(kind),
        }
    }
    acc
}

/// The K-quants take Q8_K activations, and their kernels are in [`super::kquants`].
fn k_quant(kind: QuantKind) -> ! {
    panic!("{kind:?} is dotted with Q8_K activations: see kernels::kquants")
}

/// A row kernel: `out[i] = dot(row row0 + i of weight, acts)` for every `i` of `out`, rows
/// being `row_bytes` apart; `A` is the activation block ([`ActBlock`], or the K-quants'
/// [`super::kquants::ActBlockK`]).
pub type RowsFn<A = ActBlock> = fn(&[u8], usize, &[A], &mut [f32], usize);

fn rows_scalar(
    kind: QuantKind,
    w: &[u8],
    row_bytes: usize,
    acts: &[ActBlock],
    out: &mut [f32],
    row0: usize,
) {
    for (i, y) in out.iter_mut().enumerate() {
        let r = row0 + i;
        *y = dot_scalar(kind, &w[r * row_bytes..(r + 1) * row_bytes], acts);
    }
}

macro_rules! scalar_rows {
    ($($name:ident: $kind:ident),*) => {$(
        fn $name(w: &[u8], rb: usize, a: &[ActBlock], o: &mut [f32], r0: usize) {
            rows_scalar(QuantKind::$kind, w, rb, a, o, r0)
        }
    )*};
}
scalar_rows!(scalar_q4_0: Q4_0, scalar_q4_1: Q4_1, scalar_q8_0: Q8_0, scalar_q5_0: Q5_0,
    scalar_q5_1: Q5_1);

/// Whether the AVX2 kernels can run here.
pub fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether the AVX-VNNI kernels can run here (AVX2 plus `vpdpbusd` on 256-bit vectors).
pub fn has_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx2() && std::is_x86_feature_detected!("avxvnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether this CPU has AVX-512 VNNI with 256-bit forms (AVX-512VL) but not AVX-VNNI: the
/// same `vpdpbusd`, EVEX-encoded.
pub fn has_vnni512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx2()
                && !has_vnni()
                && std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// The fastest row kernel this CPU supports for `kind`, detected once.
///
/// # Panics
/// For a K-quant `kind` (see [`super::kquants::best`]).
pub fn best(kind: QuantKind) -> RowsFn {
    #[cfg(target_arch = "x86_64")]
    if has_vnni512() {
        return match kind {
            QuantKind::Q4_0 => avx2::vnni512::q4_0,
            QuantKind::Q4_1 => avx2::vnni512::q4_1,
            QuantKind::Q8_0 => avx2::vnni512::q8_0,
            QuantKind::Q5_0 => avx2::vnni512::q5_0,
            QuantKind::Q5_1 => avx2::vnni512::q5_1,
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => k_quant(kind),
        };
    }
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        return match kind {
            QuantKind::Q4_0 => avx2::vnni::q4_0,
            QuantKind::Q4_1 => avx2::vnni::q4_1,
            QuantKind::Q8_0 => avx2::vnni::q8_0,
            QuantKind::Q5_0 => avx2::vnni::q5_0,
            QuantKind::Q5_1 => avx2::vnni::q5_1,
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => k_quant(kind),
        };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        return match kind {
            QuantKind::Q4_0 => avx2::plain::q4_0,
            QuantKind::Q4_1 => avx2::plain::q4_1,
            QuantKind::Q8_0 => avx2::plain::q8_0,
            QuantKind::Q5_0 => avx2::plain::q5_0,
            QuantKind::Q5_1 => avx2::plain::q5_1,
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => k_quant(kind),
        };
    }
    scalar(kind)
}

/// Tokens per tile of [`TileFn`].
pub const TILE: usize = 4;

/// A tile kernel: `out[i][j] = dot(row row0 + i of weight, acts[j])` for every row `i` of
/// `out` and each of [`TILE`] tokens `j`. Each weight block is unpacked once for all the
/// tokens, and each (row, token) sum is formed in exactly the order of [`RowsFn`], so a
/// token gets bit for bit what it gets alone.
pub type TileFn<A = ActBlock> = fn(&[u8], usize, [&[A]; TILE], &mut [[f32; TILE]], usize);

/// The tile kernel for `kind`, where one exists for this CPU.
///
/// # Panics
/// For a K-quant `kind` (see [`super::kquants::best_tile`]).
pub fn best_tile(kind: QuantKind) -> Option<TileFn> {
    if let Some(t) = super::avx512::tile(kind) {
        return Some(t);
    }
    #[cfg(target_arch = "x86_64")]
    if has_vnni512() {
        return match kind {
            QuantKind::Q4_1 => Some(avx2::vnni512::q4_1_tile),
            QuantKind::Q8_0 => Some(avx2::vnni512::q8_0_tile),
            QuantKind::Q5_0 => Some(avx2::vnni512::q5_0_tile),
            QuantKind::Q5_1 => Some(avx2::vnni512::q5_1_tile),
            QuantKind::Q4_0 => None,
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => k_quant(kind),
        };
    }
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        return match kind {
            QuantKind::Q4_1 => Some(avx2::vnni::q4_1_tile),
            QuantKind::Q8_0 => Some(avx2::vnni::q8_0_tile),
            QuantKind::Q5_0 => Some(avx2::vnni::q5_0_tile),
            QuantKind::Q5_1 => Some(avx2::vnni::q5_1_tile),
            QuantKind::Q4_0 => None,
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => k_quant(kind),
        };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        return match kind {
            QuantKind::Q4_1 => Some(avx2::plain::q4_1_tile),
            QuantKind::Q8_0 => Some(avx2::plain::q8_0_tile),
            QuantKind::Q5_0 => Some(avx2::plain::q5_0_tile),
            QuantKind::Q5_1 => Some(avx2::plain::q5_1_tile),
            QuantKind::Q4_0 => None,
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => k_quant(kind),
        };
    }
    let _ = kind;
    None
}

/// The scalar row kernel (the reference in tests).
///
/// # Panics
/// For a K-quant `kind` (see [`super::kquants::scalar`]).
pub fn scalar(kind: QuantKind) -> RowsFn {
    match kind {
        QuantKind::Q4_0 => scalar_q4_0,
        QuantKind::Q4_1 => scalar_q4_1,
        QuantKind::Q8_0 => scalar_q8_0,
        QuantKind::Q5_0 => scalar_q5_0,
        QuantKind::Q5_1 => scalar_q5_1,
        QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => k_quant(kind),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_q5;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::blocks::{dequantize_row, quantize_acts, BLOCK};
    use crate::kernels::test_data::{random_acts, random_row};
    use rand::{Rng, SeedableRng};

    const KINDS: [QuantKind; 5] = [
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q8_0,
        QuantKind::Q5_0,
        QuantKind::Q5_1,
    ];

    /// With every scale 1 (weights' `d` and `m`, and activations' `d`, from integer inputs
    /// whose block maximum is 127) each float operation of every kernel is exact integer
    /// arithmetic, so the kernels agree with [`dot_scalar`] bit for bit exactly when their
    /// integer block sums are llama.cpp's: compared here for the best row kernel, the plain
    /// AVX2 row and tile kernels and the best tile kernel.
    #[test]
    fn integer_sums_equal_scalar_exactly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let blocks = 24;
        let acts: Vec<Vec<ActBlock>> = (0..TILE)
            .map(|_| {
                let mut x: Vec<f32> = (0..blocks * BLOCK)
                    .map(|_| rng.gen_range(-127i32..=127) as f32)
                    .collect();
                for b in x.chunks_exact_mut(BLOCK) {
                    b[rng.gen_range(0..BLOCK)] = if rng.gen() { 127.0 } else { -127.0 };
                }
                let mut a = vec![ActBlock::default(); blocks];
                quantize_acts(&x, &mut a);
                assert!(a.iter().all(|b| b.d == 1.0));
                a
            })
            .collect();
        let one = half::f16::from_f32(1.0).to_le_bytes();
        for kind in KINDS {
            let rows = 5;
            let mut w: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(kind, blocks, &mut rng))
                .collect();
            for b in w.chunks_exact_mut(kind.block_bytes()) {
                b[..2].copy_from_slice(&one);
                if matches!(kind, QuantKind::Q4_1 | QuantKind::Q5_1) {
                    b[2..4].copy_from_slice(&one);
                }
            }
            let rb = w.len() / rows;
            let t = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
            let mut rows_fns = vec![best(kind)];
            let mut tile_fns: Vec<TileFn> = best_tile(kind).into_iter().collect();
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                rows_fns.push(match kind {
                    QuantKind::Q4_0 => avx2::plain::q4_0,
                    QuantKind::Q4_1 => avx2::plain::q4_1,
                    QuantKind::Q8_0 => avx2::plain::q8_0,
                    QuantKind::Q5_0 => avx2::plain::q5_0,
                    _ => avx2::plain::q5_1,
                });
                let plain_tile: Option<TileFn> = match kind {
                    QuantKind::Q4_1 => Some(avx2::plain::q4_1_tile),
                    QuantKind::Q8_0 => Some(avx2::plain::q8_0_tile),
                    QuantKind::Q5_0 => Some(avx2::plain::q5_0_tile),
                    QuantKind::Q5_1 => Some(avx2::plain::q5_1_tile),
                    _ => None,
                };
                tile_fns.extend(plain_tile);
            }
            for j in 0..TILE {
                let want: Vec<u32> = (0..rows)
                    .map(|r| dot_scalar(kind, &w[r * rb..(r + 1) * rb], &acts[j]).to_bits())
                    .collect();
                for f in &rows_fns {
                    let mut y = vec![0f32; rows];
                    f(&w, rb, &acts[j], &mut y, 0);
                    let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{kind:?} rows, token {j}");
                }
                for f in &tile_fns {
                    let mut y = vec![[0f32; TILE]; rows];
                    f(&w, rb, t, &mut y, 0);
                    let got: Vec<u32> = y.iter().map(|v| v[j].to_bits()).collect();
                    assert_eq!(got, want, "{kind:?} tile, token {j}");
                }
            }
        }
    }

    #[test]
    fn tiles_equal_rows_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for kind in [
            QuantKind::Q4_1,
            QuantKind::Q8_0,
            QuantKind::Q5_0,
            QuantKind::Q5_1,
        ] {
            let Some(tile) = best_tile(kind) else {
                continue;
            };
            let (rows, blocks) = (5usize, 18usize);
            let w: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(kind, blocks, &mut rng))
                .collect();
            let rb = w.len() / rows;
            let acts = random_acts(TILE, blocks, 2.0, &mut rng);
            let mut out = vec![[0f32; TILE]; rows - 1];
            tile(
                &w,
                rb,
                [&acts[0], &acts[1], &acts[2], &acts[3]],
                &mut out,
                1,
            );
            for j in 0..TILE {
                let mut alone = vec![0f32; rows - 1];
                best(kind)(&w, rb, &acts[j], &mut alone, 1);
                for i in 0..rows - 1 {
                    assert_eq!(
                        out[i][j].to_bits(),
                        alone[i].to_bits(),
                        "{kind:?} row {i} token {j}"
                    );
                }
            }
        }
    }

    /// The AVX-VNNI and AVX-512 VNNI kernels give exactly the AVX2 kernels' bits (where this
    /// CPU has them).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_equals_avx2_bit_for_bit() {
        use avx2::{plain, vnni, vnni512};
        macro_rules! sets {
            ($m:ident) => {
                (
                    [
                        (QuantKind::Q4_0, plain::q4_0 as RowsFn, $m::q4_0 as RowsFn),
                        (QuantKind::Q4_1, plain::q4_1, $m::q4_1),
                        (QuantKind::Q8_0, plain::q8_0, $m::q8_0),
                        (QuantKind::Q5_0, plain::q5_0, $m::q5_0),
                        (QuantKind::Q5_1, plain::q5_1, $m::q5_1),
                    ],
                    [
                        (
                            QuantKind::Q4_1,
                            plain::q4_1_tile as TileFn,
                            $m::q4_1_tile as TileFn,
                        ),
                        (QuantKind::Q8_0, plain::q8_0_tile, $m::q8_0_tile),
                        (QuantKind::Q5_0, plain::q5_0_tile, $m::q5_0_tile),
                        (QuantKind::Q5_1, plain::q5_1_tile, $m::q5_1_tile),
                    ],
                )
            };
        }
        let avx512vnni = std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl")
            && has_avx2();
        let mut compared = 0;
        if has_vnni() {
            let (r, t) = sets!(vnni);
            compare_with_plain(r, t);
            compared += 1;
        }
        if avx512vnni {
            let (r, t) = sets!(vnni512);
            compare_with_plain(r, t);
            compared += 1;
        }
        if compared == 0 {
            eprintln!("no VNNI here: nothing to compare");
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn compare_with_plain(
        rows_fns: [(QuantKind, RowsFn, RowsFn); 5],
        tile_fns: [(QuantKind, TileFn, TileFn); 4],
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let blocks = 24;
        let acts = random_acts(TILE, blocks, 3.0, &mut rng);
        let rows = 7;
        for (kind, p, v) in rows_fns {
            let w: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(kind, blocks, &mut rng))
                .collect();
            let rb = w.len() / rows;
            let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
            p(&w, rb, &acts[0], &mut a, 0);
            v(&w, rb, &acts[0], &mut b, 0);
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{kind:?}");
        }
        for (kind, p, v) in tile_fns {
            let w: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(kind, blocks, &mut rng))
                .collect();
            let rb = w.len() / rows;
            let t = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
            let (mut a, mut b) = (vec![[0f32; TILE]; rows], vec![[0f32; TILE]; rows]);
            p(&w, rb, t, &mut a, 0);
            v(&w, rb, t, &mut b, 0);
            for (x, y) in a.iter().zip(&b) {
                for j in 0..TILE {
                    assert_eq!(x[j].to_bits(), y[j].to_bits(), "{kind:?}");
                }
            }
        }
    }

    #[test]
    fn simd_matches_scalar_and_float_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for kind in KINDS {
            for blocks in [1usize, 3, 18, 48] {
                let row = random_row(kind, blocks, &mut rng);
                let x: Vec<f32> = (0..blocks * BLOCK)
                    .map(|_| rng.gen_range(-2.0..2.0))
                    .collect();
                let mut acts = vec![ActBlock::default(); blocks];
                quantize_acts(&x, &mut acts);
                let rb = row.len();
                let mut fast = [0f32];
                best(kind)(&row, rb, &acts, &mut fast, 0);
                let fast = fast[0];
                let slow = dot_scalar(kind, &row, &acts);
                assert!(
                    (fast - slow).abs() <= 1e-4 * (1.0 + slow.abs()),
                    "{kind:?} {fast} {slow}"
                );
                let mut w = vec![0f32; blocks * BLOCK];
                dequantize_row(kind, &row, &mut w);
                let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
                let tol = 0.02 * w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum::<f32>() + 1e-3;
                assert!(
                    (fast - exact).abs() <= tol,
                    "{kind:?} {fast} vs {exact} (tol {tol})"
                );
            }
        }
    }
}
