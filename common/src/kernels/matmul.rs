//! `y = x · Wᵀ` for a quantized `W` held as raw GGUF bytes, threaded on [`super::pool`].

use super::avx512::{Tile8Fn, TILE8};
use super::blocks::{quantize_acts, ActBlock, QuantKind, BLOCK};
use super::dot::{best, best_tile, RowsFn, TileFn, TILE};
use super::pool::{global, parallel_chunks_mut};

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
            parallel_chunks_mut(&mut blocks, k_blocks, |t, o| {
                quantize_acts(&x[t * k..(t + 1) * k], o)
            });
        } else {
            quantize_acts(x, &mut blocks);
        }
        QuantizedActs { blocks, k_blocks }
    }

    fn row(&self, t: usize) -> &[ActBlock] {
        &self.blocks[t * self.k_blocks..(t + 1) * self.k_blocks]
    }
}

/// Weight rows dotted with every token of a task while they are hot in L1.
const ROWS: usize = 16;

/// The row kernel of a format, and its tile kernel where there is one.
struct Kernels {
    rows: RowsFn,
    tile: Option<TileFn>,
    tile8: Option<Tile8Fn>,
}

/// Dots `w` weight rows from `row0` (at most `ROWS`) with every token of `tokens`, while the
/// rows are hot in L1: [`TILE`] tokens at a time where a tile kernel exists, then one at a
/// time ([`TILE8`] tokens at a time first, where the CPU has such a kernel). `put(i, t, v)`
/// stores row `row0 + i` of token `t`.
#[allow(clippy::too_many_arguments)]
fn block_all_tokens(
    kern: &Kernels,
    weight: &[u8],
    row_bytes: usize,
    acts: &QuantizedActs,
    tokens: std::ops::Range<usize>,
    row0: usize,
    w: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    debug_assert!(w <= ROWS);
    let mut t = tokens.start;
    if let Some(tile8) = kern.tile8 {
        let mut tmp = [[0f32; TILE8]; ROWS];
        while t + TILE8 <= tokens.end {
            let a: [&[ActBlock]; TILE8] = std::array::from_fn(|j| acts.row(t + j));
            tile8(weight, row_bytes, a, &mut tmp[..w], row0);
            for (i, r) in tmp[..w].iter().enumerate() {
                for (j, &v) in r.iter().enumerate() {
                    put(i, t + j, v);
                }
            }
            t += TILE8;
        }
    }
    if let Some(tile) = kern.tile {
        let mut tmp = [[0f32; TILE]; ROWS];
        while t + TILE <= tokens.end {
            let a = [
                acts.row(t),
                acts.row(t + 1),
                acts.row(t + 2),
                acts.row(t + 3),
            ];
            tile(weight, row_bytes, a, &mut tmp[..w], row0);
            for (i, r) in tmp[..w].iter().enumerate() {
                for (j, &v) in r.iter().enumerate() {
                    put(i, t + j, v);
                }
            }
            t += TILE;
        }
    }
    let mut tmp = [0f32; ROWS];
    for t in t..tokens.end {
        (kern.rows)(weight, row_bytes, acts.row(t), &mut tmp[..w], row0);
        for (i, &v) in tmp[..w].iter().enumerate() {
            put(i, t, v);
        }
    }
}

/// Most floats a per-thread scratch buffer keeps between calls (4 MiB: a 16-session step's
/// head logits fit); a larger one, from a burst of sessions or a long prompt, is freed after
/// its call rather than held by the process for good.
pub const SCRATCH_KEEP: usize = 1 << 20;

thread_local! {
    /// The rows-major scratch of the few-token path, kept by the thread that drives the call.
    static BY_ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Frees this thread's scratch of the few-token path (see [`SCRATCH_KEEP`]).
pub fn release_scratch() {
    BY_ROW.with(|b| *b.borrow_mut() = Vec::new());
}

/// Up to this many tokens, the weight rows are split among threads (W streamed once);
/// above it, the tokens are.
const SMALL_BATCH: usize = 32;

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
    let rows_fn = best(kind);
    let kern = Kernels {
        rows: rows_fn,
        tile: best_tile(kind),
        tile8: super::avx512::tile8(kind.block_bytes()),
    };
    let threads = global().threads();

    if n == 1 {
        // One token (decode): split the weight rows, so every thread streams its share of W
        // once.
        let chunk = rows.div_ceil(threads * 4).max(16);
        parallel_chunks_mut(out, chunk, |c, o| {
            rows_fn(weight, row_bytes, acts.row(0), o, c * chunk);
        });
    } else if n <= SMALL_BATCH {
        // A few tokens (batched decode steps of several sessions): still split the weight
        // rows, and dot each block of 16 rows with every token while it is hot in L1, so W is
        // streamed once for all of them. Each task fills a rows-major block; one transpose at
        // the end.
        let chunk = rows.div_ceil(threads * 4).max(ROWS);
        // Reused between calls: for the output head of a 16-session step this is 3 MB, which
        // allocated afresh each step cost page faults and a memset on the serial path.
        // It only grows: shrunk for a small product, it was filled again for the next large.
        let mut scratch = BY_ROW.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if scratch.len() < rows * n {
            scratch.resize(rows * n, 0.0);
        }
        let by_row = &mut scratch[..rows * n];
        parallel_chunks_mut(by_row, chunk * n, |c, o| {
            let r0 = c * chunk;
            let nr = o.len() / n;
            for rb in (0..nr).step_by(ROWS) {
                let w = (nr - rb).min(ROWS);
                block_all_tokens(
                    &kern,
                    weight,
                    row_bytes,
                    &acts,
                    0..n,
                    r0 + rb,
                    w,
                    |i, t, v| {
                        o[(rb + i) * n + t] = v;
                    },
                );
            }
        });
        // The transpose, one token per task: done by one thread it was ~6 % of a batched
        // decode step, with the other thread spinning meanwhile.
        parallel_chunks_mut(out, rows, |t, o| {
            for (y, col) in o.iter_mut().zip(by_row.chunks_exact(n)) {
                *y = col[t];
            }
        });
        if scratch.capacity() <= SCRATCH_KEEP {
            BY_ROW.with(|b| *b.borrow_mut() = scratch);
        }
    } else {
        // Many tokens (prefill): split the tokens; each block of 16 weight rows is dotted with
        // every token of the task while it is hot in L1.
        let per_task = n.div_ceil(threads * 2).max(1);
        parallel_chunks_mut(out, per_task * rows, |c, o| {
            let t0 = c * per_task;
            let nt = o.len() / rows;
            for r0 in (0..rows).step_by(ROWS) {
                let w = (rows - r0).min(ROWS);
                block_all_tokens(
                    &kern,
                    weight,
                    row_bytes,
                    &acts,
                    t0..t0 + nt,
                    r0,
                    w,
                    |i, t, v| {
                        o[(t - t0) * rows + r0 + i] = v;
                    },
                );
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
            dequantize_row(
                kind,
                &weight[r * row_bytes..(r + 1) * row_bytes],
                &mut w[r * k..(r + 1) * k],
            );
        }
        for n in [1usize, 3, 9, 17, 40] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut out = vec![0f32; n * rows];
            matmul(kind, &weight, rows, k, &x, &mut out);
            for t in 0..n {
                // Every path gives each token, bit for bit, what it gets alone.
                let mut alone = vec![0f32; rows];
                matmul(kind, &weight, rows, k, &x[t * k..(t + 1) * k], &mut alone);
                assert_eq!(&out[t * rows..(t + 1) * rows], &alone[..], "n={n} t={t}");
                for r in 0..rows {
                    let exact: f32 = (0..k).map(|j| x[t * k + j] * w[r * k + j]).sum();
                    assert!(
                        (out[t * rows + r] - exact).abs() < 0.05,
                        "n={n} t={t} r={r}"
                    );
                }
            }
        }
    }
}
