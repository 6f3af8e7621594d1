//! A microbenchmark of [`super::matmul`] against candle's `QMatMul` on the same weights, at
//! shapes of a small model (rows × k). Ignored by default; run it with
//! `cargo test --profile ci -p common kernels::bench -- --ignored --nocapture`, and with
//! `KERNEL_THREADS=n RAYON_NUM_THREADS=n` to give both engines `n` threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use rand::{Rng, SeedableRng};

use super::blocks::QuantKind;
use super::matmul::matmul;
use super::test_data::random_row;

/// Time per call of `f`: the best mean over 15 batches of ~20 ms after a warm-up, so that a
/// busy host (another process taking a core from the spinning pool) shows less.
fn time(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut calls = 0u32;
    while calls < 5 || start.elapsed() < Duration::from_millis(20) {
        f();
        calls += 1;
    }
    let per_batch = calls.max(5);
    (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            t.elapsed() / per_batch
        })
        .min()
        .unwrap_or_default()
}

#[test]
#[ignore = "a timing, not a check: run with --ignored --nocapture"]
fn matmul_versus_candle() -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    if let Some(n) = std::env::var("KERNEL_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        super::pool::init(n);
    }
    println!("threads: {}", super::pool::global().threads());
    for (kind, dtype, rows, k) in [
        (QuantKind::Q5_0, GgmlDType::Q5_0, 2048, 640),
        (QuantKind::Q4K, GgmlDType::Q4K, 640, 1024),
        (QuantKind::Q6K, GgmlDType::Q6K, 640, 2048),
    ] {
        let blocks = k / kind.block_elems();
        let bytes: Vec<u8> = (0..rows)
            .flat_map(|_| random_row(kind, blocks, &mut rng))
            .collect();
        let qt = qtensor_from_ggml(dtype, &bytes, vec![rows, k], &Device::Cpu)?;
        let generic = QMatMul::from_arc(Arc::new(qt))?;
        for n in [1usize, 16] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let xt = Tensor::from_vec(x.clone(), (n, k), &Device::Cpu)?;
            let mut out = vec![0f32; n * rows];
            let ours = time(|| matmul(kind, &bytes, rows, k, &x, &mut out));
            let theirs = time(|| {
                generic.forward(&xt).expect("candle's product");
            });
            // The same product, up to the activations' quantization.
            let want = generic.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?;
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = out
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            println!(
                "{kind:?} {rows}x{k}, {n:>2} tokens: ours {:>8.1} µs, candle {:>8.1} µs \
                 ({:.1}x); max |diff| {err:.2e} of {scale:.2e}",
                ours.as_secs_f64() * 1e6,
                theirs.as_secs_f64() * 1e6,
                theirs.as_secs_f64() / ours.as_secs_f64(),
            );
            assert!(err <= 0.02 * scale, "{kind:?}: results differ");
        }
    }
    Ok(())
}

/// The decode head of Gemma 3 270M (262,144 × 640, Q8_0, 178 MB): our product's read
/// bandwidth for one token, against a plain parallel sum over the same bytes.
#[test]
#[ignore = "a timing, not a check: run with --ignored --nocapture"]
fn head_bandwidth() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let (kind, rows, k) = (QuantKind::Q8_0, 262_144usize, 640usize);
    let blocks = k / kind.block_elems();
    let bytes: Vec<u8> = (0..rows)
        .flat_map(|_| random_row(kind, blocks, &mut rng))
        .collect();
    let x: Vec<f32> = (0..k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut out = vec![0f32; rows];
    let ours = time(|| matmul(kind, &bytes, rows, k, &x, &mut out));
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let mut sums = vec![0u64; 64];
    let sum = time(|| {
        let per = words.len().div_ceil(64);
        super::pool::parallel_chunks_mut(&mut sums, 1, |i, s| {
            let part = &words[(i * per).min(words.len())..((i + 1) * per).min(words.len())];
            s[0] = part.iter().fold(0u64, |a, &w| a.wrapping_add(w));
        });
    });
    let gb = bytes.len() as f64 / 1e9;
    println!(
        "head {rows}x{k} Q8_0 ({:.0} MB): ours {:.2} ms ({:.1} GB/s); plain sum {:.2} ms ({:.1} GB/s)",
        gb * 1e3,
        ours.as_secs_f64() * 1e3,
        gb / ours.as_secs_f64(),
        sum.as_secs_f64() * 1e3,
        gb / sum.as_secs_f64(),
    );
}
