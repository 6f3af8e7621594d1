//! Random weight rows and activations for the kernels' tests.

use half::f16;
use rand::Rng;

use super::blocks::{quantize_acts, ActBlock, QuantKind, BLOCK};

/// One weight row of `blocks` random blocks of `kind`, with realistic scales.
pub fn random_row(kind: QuantKind, blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut row = Vec::new();
    for _ in 0..blocks {
        row.extend_from_slice(&f16::from_f32(rng.gen_range(-0.1..0.1)).to_le_bytes());
        let rest = kind.block_bytes() - 2;
        if kind == QuantKind::Q4_1 {
            row.extend_from_slice(&f16::from_f32(rng.gen_range(-0.5..0.5)).to_le_bytes());
            row.extend((0..rest - 2).map(|_| rng.r#gen::<u8>()));
        } else {
            row.extend((0..rest).map(|_| rng.r#gen::<u8>()));
        }
    }
    row
}

/// `tokens` rows of `blocks` quantized activation blocks, values uniform in ±`range`.
pub fn random_acts(
    tokens: usize,
    blocks: usize,
    range: f32,
    rng: &mut impl Rng,
) -> Vec<Vec<ActBlock>> {
    (0..tokens)
        .map(|_| {
            let x: Vec<f32> = (0..blocks * BLOCK)
                .map(|_| rng.gen_range(-range..range))
                .collect();
            let mut a = vec![ActBlock::default(); blocks];
            quantize_acts(&x, &mut a);
            a
        })
        .collect()
}
