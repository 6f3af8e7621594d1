//! Token sampling: greedy, temperature, top-k, top-p, a seed that makes runs reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Validated sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    /// Seed of the random stream; the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        // Greedy, so that outputs are reproducible unless asked otherwise.
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks ranges: temperature in [0, 100], top_p in (0, 1].
    pub fn validate(self) -> Result<Self> {
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return Err(Error::Config(format!(
                "temperature {} is not in [0, 100]",
                self.temperature
            )));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Config(format!(
                "top_p {} is not in (0, 1]",
                self.top_p
            )));
        }
        Ok(self)
    }
}

/// Picks tokens from logits.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest value (the first one on ties, as llama.cpp).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Each row's [`argmax`] of `logits: [n, vocab]`, where the logits are: on a CUDA device by
/// our kernel (`crate::cuda::argmax`), which copies only the picks to the host; elsewhere on
/// the host. A row holding a NaN is an error, as in [`Sampler::sample`].
pub fn greedy_rows(logits: &candle_core::Tensor) -> Result<Vec<u32>> {
    #[cfg(feature = "cuda")]
    if let Some(picks) = crate::cuda::argmax::rows(logits)? {
        return Ok(picks);
    }
    let logits = logits.to_dtype(candle_core::DType::F32)?;
    let (n, vocab) = logits.dims2()?;
    if logits.device().is_cpu() {
        if let Some((a, b)) = logits.layout().contiguous_offsets() {
            // On the CPU, read the rows where they are, one row per pool task: a copy of a
            // 16-session step's logits was 3 MB on the serial path.
            let (storage, _) = logits.storage_and_layout();
            if let candle_core::Storage::Cpu(cpu) = &*storage {
                return greedy_host_rows(&cpu.as_slice::<f32>()?[a..b], n, vocab);
            }
        }
    }
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    rows.iter()
        .map(|r| checked(r).map(|()| argmax(r)))
        .collect()
}

/// Each row's [`argmax`] of `n` rows of `vocab` logits held row-major on the host, one row
/// per pool task; a row holding a NaN is an error.
pub fn greedy_host_rows(data: &[f32], n: usize, vocab: usize) -> Result<Vec<u32>> {
    if data.len() != n * vocab {
        return Err(Error::InvalidInput(format!(
            "{} logits for {n} rows of {vocab}",
            data.len()
        )));
    }
    let mut picks: Vec<Result<u32>> = (0..n).map(|_| Ok(0)).collect();
    crate::kernels::pool::parallel_chunks_mut(&mut picks, 1, |r, p| {
        let row = &data[r * vocab..(r + 1) * vocab];
        p[0] = checked(row).map(|()| argmax(row));
    });
    picks.into_iter().collect()
}

/// Logits a pick can be made from: not empty, no NaN.
fn checked(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(Error::InvalidInput("no logits to sample from".into()));
    }
    if logits.iter().any(|v| v.is_nan()) {
        return Err(Error::InvalidInput("logits contain NaN".into()));
    }
    Ok(())
}

impl Sampler {
    /// Whether [`Sampler::sample`] picks the largest logit, with no randomness: such picks
    /// may be made where the logits are ([`greedy_rows`]), and the sampler's state is the
    /// same either way.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 || self.params.top_k == 1
    }

    /// A sampler with its own random stream.
    pub fn new(params: SamplingParams) -> Result<Self> {
        let params = params.validate()?;
        Ok(Sampler {
            rng: StdRng::seed_from_u64(params.seed),
            params,
        })
    }

    /// Picks the next token.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        checked(logits)?;
        let p = &self.params;
        if p.temperature == 0.0 || p.top_k == 1 {
            return Ok(argmax(logits));
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v))
            .collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand
            .iter()
            .map(|&(_, v)| ((v - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f32 = self.rng.gen();
        let mut acc = 0.0;
        for (i, &x) in probs.iter().enumerate() {
            acc += x;
            if r < acc {
                return Ok(cand[i].0);
            }
        }
        Ok(cand[probs.len() - 1].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greedy picks of rows on the CPU: the first largest value of each row, which is what
    /// a greedy sampler picks; a NaN is an error in both.
    #[test]
    fn greedy_rows_pick_what_the_sampler_picks() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let rows = [[0.1f32, 3.0, 2.9, 3.0], [-1.0, -1.0, -2.0, -5.0]];
        let t = candle_core::Tensor::new(&rows, &dev)?;
        let mut greedy = Sampler::new(SamplingParams::default())?;
        assert!(greedy.is_greedy());
        let want = rows
            .iter()
            .map(|r| greedy.sample(r))
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(greedy_rows(&t)?, want);
        assert_eq!(want, [1, 0]);
        let nan = candle_core::Tensor::new(&[[0.0f32, f32::NAN]], &dev)?;
        assert!(greedy_rows(&nan).is_err());
        assert!(greedy.sample(&[0.0, f32::NAN]).is_err());
        let warm = Sampler::new(SamplingParams {
            temperature: 0.8,
            ..SamplingParams::default()
        })?;
        assert!(!warm.is_greedy());
        Ok(())
    }

    #[test]
    fn greedy_seeded_and_filtered() -> Result<()> {
        let logits = [0.1, 3.0, 2.9, -1.0, 3.0];
        assert_eq!(Sampler::new(SamplingParams::default())?.sample(&logits)?, 1);
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone())?;
            (0..50).map(|_| s.sample(&logits)).collect::<Result<_>>()?
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p.clone())?;
            (0..50).map(|_| s.sample(&logits)).collect::<Result<_>>()?
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 should vary");
        let mut k2 = Sampler::new(SamplingParams {
            top_k: 2,
            ..p.clone()
        })?;
        for _ in 0..50 {
            assert!([1, 4].contains(&k2.sample(&logits)?));
        }
        let mut tp = Sampler::new(SamplingParams { top_p: 0.01, ..p })?;
        for _ in 0..20 {
            assert_eq!(tp.sample(&logits)?, 1);
        }
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams::default())?
            .sample(&[f32::NAN])
            .is_err());
        Ok(())
    }
}
