//! `y = x · Wᵀ` for a quantized `W` held as raw GGUF bytes, threaded on [`super::pool`].

use super::avx512::{Tile8Fn, TILE8};
use super::blocks::{ActBlock, Acts, QuantKind};
use super::dot::{RowsFn, TileFn, TILE};
use super::kquants::{self, ActBlockK};
use super::pool::{global, parallel_chunks_mut};

/// Activations quantized once per call and shared by every weight row: [`ActBlock`]s for the
/// 32-block formats, Q8_K [`ActBlockK`]s for the K-quants.
#[derive(Debug, Default)]
pub struct QuantizedActs<A = ActBlock> {
    blocks: Vec<A>,
    k_blocks: usize,
}

impl<A: Acts> QuantizedActs<A> {
    /// Quantizes `n` rows of `k` values each.
    pub fn new(x: &[f32], k: usize) -> Self {
        let k_blocks = k / A::ELEMS;
        let mut blocks = vec![A::default(); x.len() / A::ELEMS];
        if x.len() >= 4 * k {
            parallel_chunks_mut(&mut blocks, k_blocks, |t, o| {
                A::quantize(&x[t * k..(t + 1) * k], o)
            });
        } else {
            A::quantize(x, &mut blocks);
        }
        QuantizedActs { blocks, k_blocks }
    }

    fn row(&self, t: usize) -> &[A] {
        &self.blocks[t * self.k_blocks..(t + 1) * self.k_blocks]
    }
}

/// Weight rows dotted with every token of a task while they are hot in L1.
const ROWS: usize = 16;

/// The row kernel of a format, and its tile kernels where there are.
struct Kernels<A> {
    rows: RowsFn<A>,
    tile: Option<TileFn<A>>,
    tile8: Option<Tile8Fn<A>>,
}

/// Dots `w` weight rows from `row0` (at most `ROWS`) with every token of `tokens`, while the
/// rows are hot in L1: [`TILE`] tokens at a time where a tile kernel exists, then one at a
/// time ([`TILE8`] tokens at a time first, where the CPU has such a kernel). `put(i, t, v)`
/// stores row `row0 + i` of token `t`.
#[allow(clippy::too_many_arguments)]
fn block_all_tokens<A: Acts>(
    kern: &Kernels<A>,
    weight: &[u8],
    row_bytes: usize,
    acts: &QuantizedActs<A>,
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
            let a: [&[A]; TILE8] = std::array::from_fn(|j| acts.row(t + j));
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
/// `weight` is `rows` rows of `k / kind.block_elems()` blocks of `kind` (for a K-quant, `k`
/// is a multiple of 256); `out` is `n × rows`, row-major. The activations are quantized as
/// llama.cpp does for `kind`: to Q8_0/Q8_1 blocks of 32, or to Q8_K blocks of 256. The caller
/// guarantees the sizes (checked by `debug_assert`s and by the slicing).
pub fn matmul(kind: QuantKind, weight: &[u8], rows: usize, k: usize, x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(k % kind.block_elems(), 0);
    let row_bytes = k / kind.block_elems() * kind.block_bytes();
    debug_assert_eq!(weight.len(), rows * row_bytes);
    match kind {
        QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q8_0 | QuantKind::Q5_0 | QuantKind::Q5_1 => {
            let kern = Kernels::<ActBlock> {
                rows: super::dot::best(kind),
                tile: super::dot::best_tile(kind),
                tile8: super::avx512::tile8(kind),
            };
            product(&kern, weight, rows, row_bytes, k, x, out)
        }
        QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => {
            let kern = Kernels::<ActBlockK> {
                rows: kquants::best(kind),
                tile: kquants::best_tile(kind),
                tile8: kquants::best_tile8(kind),
            };
            product(&kern, weight, rows, row_bytes, k, x, out)
        }
    }
}

/// [`matmul`] with the kernels of one format and its activations `A`.
fn product<A: Acts>(
    kern: &Kernels<A>,
    weight: &[u8],
    rows: usize,
    row_bytes: usize,
    k: usize,
    x: &[f32],
    out: &mut [f32],
) {
    let n = x.len() / k;
    debug_assert_eq!(out.len(), n * rows);
    let acts = QuantizedActs::<A>::new(x, k);
    let rows_fn = kern.rows;
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
                    kern,
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
                    kern,
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
    use crate::kernels::blocks::{dequantize_row, BLOCK};
    use crate::kernels::test_data::random_row;
    use rand::{Rng, SeedableRng};

    /// For every kind and every path (1 token, the few-token row split with 8- and 4-token
    /// tiles and single tokens, the many-token split), each token gets bit for bit what it
    /// gets alone, within a tolerance of the dequantized f32 product.
    #[test]
    fn every_kind_one_token_equals_many_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let (rows, k) = (37, 512);
        for kind in [
            QuantKind::Q4_0,
            QuantKind::Q4_1,
            QuantKind::Q8_0,
            QuantKind::Q5_0,
            QuantKind::Q5_1,
            QuantKind::Q4K,
            QuantKind::Q5K,
            QuantKind::Q6K,
        ] {
            let blocks = k / kind.block_elems();
            let row_bytes = blocks * kind.block_bytes();
            let weight: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(kind, blocks, &mut rng))
                .collect();
            let mut w = vec![0f32; rows * k];
            for (r, o) in w.chunks_exact_mut(k).enumerate() {
                dequantize_row(kind, &weight[r * row_bytes..(r + 1) * row_bytes], o);
            }
            for n in [1usize, 3, 13, 40] {
                let x: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut out = vec![0f32; n * rows];
                matmul(kind, &weight, rows, k, &x, &mut out);
                for t in 0..n {
                    let xt = &x[t * k..(t + 1) * k];
                    let mut alone = vec![0f32; rows];
                    matmul(kind, &weight, rows, k, xt, &mut alone);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&out[t * rows..(t + 1) * rows]),
                        bits(&alone),
                        "{kind:?} n={n} t={t}"
                    );
                    for (r, wr) in w.chunks_exact(k).enumerate() {
                        let exact: f32 = wr.iter().zip(xt).map(|(a, b)| a * b).sum();
                        let mag: f32 = wr.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                        let got = out[t * rows + r];
                        assert!(
                            (got - exact).abs() <= 0.02 * mag + 1e-3,
                            "{kind:?} n={n} t={t} r={r}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

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
