//! Random weight rows and activations for the kernels' tests.

use half::f16;
use rand::Rng;

use super::blocks::{ActBlock, Acts, QuantKind};
use super::kquants::ActBlockK;

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// One weight row of `blocks` random blocks of `kind`: random bytes, with realistic scales
/// (and mins) in the f16 fields.
pub fn random_row(kind: QuantKind, blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
    let bb = kind.block_bytes();
    let mut row: Vec<u8> = (0..blocks * bb).map(|_| rng.r#gen::<u8>()).collect();
    for b in row.chunks_exact_mut(bb) {
        match kind {
            QuantKind::Q4_0 | QuantKind::Q5_0 | QuantKind::Q8_0 => {
                put_f16(b, 0, rng.gen_range(-0.1..0.1))
            }
            QuantKind::Q4_1 | QuantKind::Q5_1 => {
                put_f16(b, 0, rng.gen_range(-0.1..0.1));
                put_f16(b, 2, rng.gen_range(-0.5..0.5));
            }
            // The effective scales are d·sc and dmin·m with 6-bit sc and m (8-bit for Q6_K).
            QuantKind::Q4K | QuantKind::Q5K => {
                put_f16(b, 0, rng.gen_range(-0.004..0.004));
                put_f16(b, 2, rng.gen_range(-0.004..0.004));
            }
            QuantKind::Q6K => put_f16(b, 208, rng.gen_range(-0.002..0.002)),
        }
    }
    row
}

/// `tokens` rows of `blocks` quantized activation blocks of `A`, values uniform in ±`range`.
pub fn random_acts_of<A: Acts>(
    tokens: usize,
    blocks: usize,
    range: f32,
    rng: &mut impl Rng,
) -> Vec<Vec<A>> {
    (0..tokens)
        .map(|_| {
            let x: Vec<f32> = (0..blocks * A::ELEMS)
                .map(|_| rng.gen_range(-range..range))
                .collect();
            let mut a = vec![A::default(); blocks];
            A::quantize(&x, &mut a);
            a
        })
        .collect()
}

/// `tokens` rows of `blocks` 32-value activation blocks, values uniform in ±`range`.
pub fn random_acts(
    tokens: usize,
    blocks: usize,
    range: f32,
    rng: &mut impl Rng,
) -> Vec<Vec<ActBlock>> {
    random_acts_of(tokens, blocks, range, rng)
}

/// `tokens` rows of `blocks` Q8_K activation blocks, values uniform in ±`range`.
pub fn random_acts_k(
    tokens: usize,
    blocks: usize,
    range: f32,
    rng: &mut impl Rng,
) -> Vec<Vec<ActBlockK>> {
    random_acts_of(tokens, blocks, range, rng)
}
