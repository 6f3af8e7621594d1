//! Token sampling: greedy, temperature, top-k, top-p, min-p, a seed that makes runs
//! reproducible; OpenAI's presence and frequency penalties, the repetition penalty and logit
//! biases ([`adjust`]); the chosen token's log-probability and the most likely alternatives
//! ([`logprobs`]).
//!
//! The order, per pick: biases and penalties change the logits; greedy takes the largest;
//! otherwise temperature, top-k, top-p, then min-p choose the candidates, and the seeded
//! random stream picks one. Log-probabilities are the model's own (the logits before any of
//! this), as vLLM reports them by default.

pub mod adjust;
pub mod logprobs;

use std::borrow::Cow;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::grammar::Constraint;
use adjust::History;
pub use logprobs::TokenLogprobs;

/// The most alternatives a pick reports with its log-probability (OpenAI's `top_logprobs`
/// limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Validated sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    /// Keep only tokens at least `min_p` times as likely as the most likely one (0: all).
    pub min_p: f32,
    /// Seed of the random stream; the same seed gives the same tokens.
    pub seed: u64,
    /// Subtracted once from the logit of every token already generated (OpenAI's
    /// `presence_penalty`, in [-2, 2]).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`, in [-2, 2]).
    pub frequency_penalty: f32,
    /// Divides positive logits and multiplies negative ones of every token in the prompt or
    /// generated so far (vLLM's and Hugging Face's `repetition_penalty`, in (0, 2]; 1: off).
    pub repetition_penalty: f32,
    /// Added to the logits of these tokens (OpenAI's `logit_bias`, each in [-100, 100]).
    pub logit_bias: Vec<(u32, f32)>,
    /// Report the chosen token's log-probability and this many of the most likely tokens
    /// with theirs (`None`: no log-probabilities).
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        // Greedy, so that outputs are reproducible unless asked otherwise.
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

/// `Err` naming `what` unless `v` is finite and `ok`.
fn check(what: &str, v: f32, ok: bool, range: &str) -> Result<()> {
    if v.is_finite() && ok {
        Ok(())
    } else {
        Err(Error::Config(format!("{what} {v} is not in {range}")))
    }
}

impl SamplingParams {
    /// Checks ranges: temperature in [0, 100], top_p in (0, 1], min_p in [0, 1], the
    /// presence and frequency penalties in [-2, 2], the repetition penalty in (0, 2], each
    /// bias in [-100, 100], at most [`MAX_TOP_LOGPROBS`] alternatives.
    pub fn validate(self) -> Result<Self> {
        let t = self.temperature;
        check("temperature", t, (0.0..=100.0).contains(&t), "[0, 100]")?;
        let p = self.top_p;
        check("top_p", p, p > 0.0 && p <= 1.0, "(0, 1]")?;
        let m = self.min_p;
        check("min_p", m, (0.0..=1.0).contains(&m), "[0, 1]")?;
        for (what, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            check(what, v, (-2.0..=2.0).contains(&v), "[-2, 2]")?;
        }
        let r = self.repetition_penalty;
        check("repetition_penalty", r, r > 0.0 && r <= 2.0, "(0, 2]")?;
        for &(id, b) in &self.logit_bias {
            check(
                &format!("logit_bias of token {id}"),
                b,
                (-100.0..=100.0).contains(&b),
                "[-100, 100]",
            )?;
        }
        if let Some(k) = self.logprobs {
            if k > MAX_TOP_LOGPROBS {
                return Err(Error::Config(format!(
                    "{k} top log-probabilities asked for, at most {MAX_TOP_LOGPROBS}"
                )));
            }
        }
        Ok(self)
    }

    /// Whether biases or penalties change the logits.
    pub fn adjusts(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
    }
}

/// A token picked, with its log-probabilities when they were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    /// The token.
    pub token: u32,
    /// Its log-probability and the most likely alternatives.
    pub logprobs: Option<TokenLogprobs>,
}

/// Picks tokens from logits, and remembers the picks (for the penalties).
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    history: History,
    /// The grammar the picks must follow, if any.
    constraint: Option<Constraint>,
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
    /// Whether [`Sampler::sample`] picks the largest raw logit, with no randomness, no
    /// adjustment and no log-probabilities: such picks may be made where the logits are
    /// ([`greedy_rows`]), with [`Sampler::record`] told of them.
    pub fn is_greedy(&self) -> bool {
        let p = &self.params;
        (p.temperature == 0.0 || p.top_k == 1)
            && !p.adjusts()
            && p.logprobs.is_none()
            && self.constraint.is_none()
    }

    /// A sampler with its own random stream.
    pub fn new(params: SamplingParams) -> Result<Self> {
        let params = params.validate()?;
        Ok(Sampler {
            rng: StdRng::seed_from_u64(params.seed),
            history: History::default(),
            constraint: None,
            params,
        })
    }

    /// Picks only what `c` allows, and tells it of each pick.
    pub fn with_constraint(mut self, c: Constraint) -> Self {
        self.constraint = Some(c);
        self
    }

    /// The prompt's tokens, which the repetition penalty counts too.
    pub fn with_prompt(mut self, prompt: &[u32]) -> Self {
        if self.params.repetition_penalty != 1.0 {
            self.history.prompt(prompt);
        }
        self
    }

    /// Remembers `token` as generated (a pick made elsewhere, by [`greedy_rows`]).
    pub fn record(&mut self, token: u32) {
        if self.params.adjusts() {
            self.history.push(token);
        }
    }

    /// Picks the next token and remembers it.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        Ok(self.pick(logits)?.token)
    }

    /// Picks the next token, with its log-probabilities when they were asked for, and
    /// remembers it.
    pub fn pick(&mut self, logits: &[f32]) -> Result<Pick> {
        checked(logits)?;
        let raw = logits;
        let logits: Cow<'_, [f32]> = if self.params.adjusts() || self.constraint.is_some() {
            let mut v = raw.to_vec();
            self.history.adjust(&self.params, &mut v);
            if let Some(c) = &mut self.constraint {
                c.mask(&mut v)?;
            }
            Cow::Owned(v)
        } else {
            Cow::Borrowed(raw)
        };
        let token = self.choose(&logits);
        if let Some(c) = &mut self.constraint {
            c.commit(token)?;
        }
        self.record(token);
        let logprobs = self
            .params
            .logprobs
            .map(|k| TokenLogprobs::of(raw, token, k));
        Ok(Pick { token, logprobs })
    }

    /// The pick from (adjusted) logits.
    fn choose(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > f32::NEG_INFINITY)
            .map(|(i, &v)| (i as u32, v))
            .collect();
        if cand.is_empty() {
            // Every token biased away: the least unlikely is all that is left.
            return argmax(logits);
        }
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
        }
        if p.min_p > 0.0 {
            // probs[0] is the largest: keep those at least min_p times as likely.
            let floor = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            probs.truncate(keep);
        }
        let s: f32 = probs.iter().sum();
        let r: f32 = self.rng.gen::<f32>() * s;
        let mut acc = 0.0;
        for (i, &x) in probs.iter().enumerate() {
            acc += x;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
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
            seed: 42,
            ..SamplingParams::default()
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

    #[test]
    fn min_p_biases_penalties_and_logprobs() -> Result<()> {
        let logits = [0.0, 3.0, 2.9, -10.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: 7,
            ..SamplingParams::default()
        })?;
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect::<Result<_>>()?;
        assert!(
            picks.iter().all(|t| [1, 2].contains(t)),
            "min_p keeps 1 and 2"
        );
        assert!(picks.contains(&1) && picks.contains(&2));
        // greedy, with a frequency penalty: the second pick moves off the first
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.5,
            ..SamplingParams::default()
        })?;
        assert!(!s.is_greedy(), "adjusted logits are picked on the host");
        assert_eq!(s.sample(&logits)?, 1);
        assert_eq!(s.sample(&logits)?, 2);
        // a bias that rules a token out
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..SamplingParams::default()
        })?;
        assert_eq!(s.sample(&logits)?, 2);
        // log-probabilities are the model's, whatever the bias did
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(1, -100.0)],
            logprobs: Some(2),
            ..SamplingParams::default()
        })?;
        let p = s.pick(&logits)?;
        let l = p.logprobs.expect("asked for");
        assert_eq!(p.token, 2);
        assert_eq!(l.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!((l.logprob - l.top[1].1).abs() < 1e-6);
        assert!(Sampler::new(SamplingParams {
            logprobs: Some(MAX_TOP_LOGPROBS + 1),
            ..Default::default()
        })
        .is_err());
        Ok(())
    }
}
