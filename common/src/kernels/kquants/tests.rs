use rand::{Rng, SeedableRng};

use super::*;
use crate::kernels::avx512::TILE8;
use crate::kernels::dot::TILE;
use crate::kernels::test_data::{random_acts_k, random_row};

const KINDS: [QuantKind; 3] = [QuantKind::Q4K, QuantKind::Q5K, QuantKind::Q6K];

/// [`scales_mins`] against llama.cpp's `get_scale_min_k4`, written out per index.
#[test]
fn scale_unpacking_is_get_scale_min_k4() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..100 {
        let q: [u8; 12] = std::array::from_fn(|_| rng.r#gen());
        let (sc, m) = scales_mins(&q);
        for j in 0..8 {
            let want = if j < 4 {
                (q[j] & 63, q[j + 4] & 63)
            } else {
                (
                    (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                    (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
                )
            };
            assert_eq!((sc[j], m[j]), want, "j={j}");
        }
    }
}

/// The integer parts against the dequantized block: with `d = 1, dmin = 0` each weight is
/// the integer `sc·q` (Q6_K: `sc·(q - 32)`), with `d = 0, dmin = 1` it is `-m`, so the lanes
/// and the min products must sum to those weights times the activations.
#[test]
fn block_integers_are_the_dequantized_products() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let one = half::f16::from_f32(1.0).to_le_bytes();
    for kind in KINDS {
        for _ in 0..20 {
            let mut b = random_row(kind, 1, &mut rng);
            let a = random_acts_k(1, 1, 5.0, &mut rng).remove(0)[0];
            let mut w = [0f32; QK_K];
            // The weights are exact integers here.
            let dot = |w: &[f32]| -> i64 {
                w.iter()
                    .zip(&a.qs)
                    .map(|(&w, &q)| w as i64 * i64::from(q))
                    .sum()
            };
            if kind == QuantKind::Q6K {
                b[208..210].copy_from_slice(&one);
            } else {
                b[..2].copy_from_slice(&one);
                b[2..4].fill(0);
            }
            dequantize_block(kind, &b, &mut w);
            let (lanes, _) = block_ints(kind, &b, &a);
            assert_eq!(
                lanes.iter().map(|&l| i64::from(l)).sum::<i64>(),
                dot(&w),
                "{kind:?}"
            );
            if kind != QuantKind::Q6K {
                b[..2].fill(0);
                b[2..4].copy_from_slice(&one);
                dequantize_block(kind, &b, &mut w);
                let (_, mins) = block_ints(kind, &b, &a);
                let mins: i64 = mins.iter().map(|&m| i64::from(m)).sum();
                assert_eq!(-mins, dot(&w), "{kind:?} mins");
            }
        }
    }
}

#[test]
fn scalar_dot_matches_dequantized_float_product() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for kind in KINDS {
        for blocks in [1usize, 3, 8] {
            let row = random_row(kind, blocks, &mut rng);
            let x: Vec<f32> = (0..blocks * QK_K)
                .map(|_| rng.gen_range(-2.0..2.0))
                .collect();
            let mut acts = vec![ActBlockK::default(); blocks];
            quantize_acts_k(&x, &mut acts);
            let got = dot_scalar(kind, &row, &acts);
            let mut w = vec![0f32; blocks * QK_K];
            for (b, o) in row
                .chunks_exact(kind.block_bytes())
                .zip(w.chunks_exact_mut(QK_K))
            {
                dequantize_block(kind, b, o);
            }
            let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
            let mag: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            assert!(
                (got - exact).abs() <= 0.01 * mag + 1e-4,
                "{kind:?} blocks {blocks}: {got} vs {exact} (of {mag})"
            );
        }
    }
}

/// Every SIMD kernel (the best row kernel, the AVX2 row kernel, the 4-token and 8-token
/// tiles) gives each (row, token) exactly the bits of [`dot_scalar`], which performs
/// llama.cpp's AVX2 float operations on the integer lanes it forms itself: so their integer
/// lanes and min products are the scalar ones, and their float assembly is the same.
#[test]
fn simd_kernels_equal_scalar_bit_for_bit() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for kind in KINDS {
        for (rows, blocks) in [(1usize, 1usize), (6, 2), (7, 4), (16, 3)] {
            let w: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(kind, blocks, &mut rng))
                .collect();
            let rb = w.len() / rows;
            let acts = random_acts_k(TILE8, blocks, 3.0, &mut rng);
            let want: Vec<Vec<u32>> = (0..TILE8)
                .map(|t| {
                    (0..rows)
                        .map(|r| dot_scalar(kind, &w[r * rb..(r + 1) * rb], &acts[t]).to_bits())
                        .collect()
                })
                .collect();
            // From row r0, so odd counts and offsets are exercised.
            let r0 = rows / 3;
            let n = rows - r0;
            let mut rows_fns = vec![("best", best(kind))];
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::dot::has_avx2() {
                rows_fns.push((
                    "avx2",
                    match kind {
                        QuantKind::Q4K => avx2::q4_k,
                        QuantKind::Q5K => avx2::q5_k,
                        _ => avx2::q6_k,
                    },
                ));
            }
            for (name, f) in rows_fns {
                for (t, a) in acts.iter().enumerate() {
                    let mut y = vec![0f32; n];
                    f(&w, rb, a, &mut y, r0);
                    let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want[t][r0..], "{kind:?} {name} rows {rows} token {t}");
                }
            }
            if let Some(tile) = best_tile(kind) {
                for t0 in [0, TILE] {
                    let a: [&[ActBlockK]; TILE] = std::array::from_fn(|j| &acts[t0 + j][..]);
                    let mut y = vec![[0f32; TILE]; n];
                    tile(&w, rb, a, &mut y, r0);
                    for j in 0..TILE {
                        let got: Vec<u32> = y.iter().map(|v| v[j].to_bits()).collect();
                        assert_eq!(got, want[t0 + j][r0..], "{kind:?} tile rows {rows}");
                    }
                }
            }
            match best_tile8(kind) {
                Some(tile8) => {
                    let a: [&[ActBlockK]; TILE8] = std::array::from_fn(|j| &acts[j][..]);
                    let mut y = vec![[0f32; TILE8]; n];
                    tile8(&w, rb, a, &mut y, r0);
                    for (j, want) in want.iter().enumerate() {
                        let got: Vec<u32> = y.iter().map(|v| v[j].to_bits()).collect();
                        assert_eq!(got, want[r0..], "{kind:?} tile8 rows {rows}");
                    }
                }
                None => eprintln!("no AVX-512 here: 8-token tiles not compared"),
            }
        }
    }
}
