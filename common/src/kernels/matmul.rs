//! `y = x · Wᵀ` for a quantized `W` held as raw GGUF bytes, threaded with rayon.

use rayon::prelude::*;

use super::blocks::{quantize_acts, ActBlock, QuantKind, BLOCK};
use super::dot::best;

/// Activations quantized once per call and shared by every weight row.
#[derive(Debug, Default)]
pub struct QuantizedActs {
    blocks: Vec<ActBlock>,
    k_blocks: usize,
}

impl QuantizedActs {
    /// Quantizes `n` rows of `k` values each.
    pub fn new(x: &[f32], k: usize) -> Self {
        let k_blocks = k / BLOCK;
        let mut blocks = vec![ActBlock::default(); x.len() / BLOCK];
        if x.len() >= 4 * k {
            blocks
                .par_chunks_mut(k_blocks)
                .zip(x.par_chunks(k))
                .for_each(|(o, xi)| quantize_acts(xi, o));
        } else {
            quantize_acts(x, &mut blocks);
        }
        QuantizedActs { blocks, k_blocks }
    }

    fn row(&self, t: usize) -> &[ActBlock] {
        &self.blocks[t * self.k_blocks..(t + 1) * self.k_blocks]
    }
}

/// Computes `out[t][r] = Σ_j x[t][j] · W[r][j]` for `n = x.len() / k` tokens.
///
/// `weight` is `rows` rows of `k / 32` blocks of `kind`; `out` is `n × rows`, row-major.
/// The caller guarantees the sizes (checked by `debug_assert`s and by the slicing).
pub fn matmul(kind: QuantKind, weight: &[u8], rows: usize, k: usize, x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(k % BLOCK, 0);
    let row_bytes = k / BLOCK * kind.block_bytes();
    debug_assert_eq!(weight.len(), rows * row_bytes);
    let n = x.len() / k;
    debug_assert_eq!(out.len(), n * rows);
    let acts = QuantizedActs::new(x, k);
    let dot = best(kind);
    let threads = rayon::current_num_threads().max(1);

    if n < 2 * threads {
        // Few tokens: split the weight rows, so every thread streams its share of W once.
        let chunk = rows.div_ceil(threads * 4).max(16);
        for t in 0..n {
            let a = acts.row(t);
            out[t * rows..(t + 1) * rows]
                .par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(c, o)| {
                    let r0 = c * chunk;
                    for (i, y) in o.iter_mut().enumerate() {
                        let r = r0 + i;
                        *y = dot(&weight[r * row_bytes..(r + 1) * row_bytes], a);
                    }
                });
        }
    } else {
        // Many tokens (prefill): split the tokens; each weight row is read once per group
        // and dotted with every token of the group while it is hot in L1.
        const GROUP: usize = 4;
        let per_task = n.div_ceil(threads).max(GROUP);
        out.par_chunks_mut(per_task * rows).enumerate().for_each(|(c, o)| {
            let t0 = c * per_task;
            let nt = o.len() / rows;
            for g in (0..nt).step_by(GROUP) {
                let ge = (g + GROUP).min(nt);
                for r in 0..rows {
                    let w = &weight[r * row_bytes..(r + 1) * row_bytes];
                    for t in g..ge {
                        o[t * rows + r] = dot(w, acts.row(t0 + t));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::blocks::dequantize_row;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matmul_matches_dequantized_reference_for_one_and_many_tokens() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (rows, k) = (37, 96);
        let kind = QuantKind::Q4_1;
        let row_bytes = k / BLOCK * kind.block_bytes();
        let mut weight = vec![0u8; rows * row_bytes];
        for r in 0..rows {
            for b in 0..k / BLOCK {
                let at = r * row_bytes + b * 20;
                weight[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                weight[at + 2..at + 4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
                for j in 4..20 {
                    weight[at + j] = rng.gen();
                }
            }
        }
        let mut w = vec![0f32; rows * k];
        for r in 0..rows {
            dequantize_row(kind, &weight[r * row_bytes..(r + 1) * row_bytes], &mut w[r * k..(r + 1) * k]);
        }
        for n in [1usize, 3, 9, 17] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut out = vec![0f32; n * rows];
            matmul(kind, &weight, rows, k, &x, &mut out);
            for t in 0..n {
                for r in 0..rows {
                    let exact: f32 = (0..k).map(|j| x[t * k + j] * w[r * k + j]).sum();
                    assert!((out[t * rows + r] - exact).abs() < 0.05, "n={n} t={t} r={r}");
                }
            }
        }
    }
}
