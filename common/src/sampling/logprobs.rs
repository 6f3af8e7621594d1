//! Log-probabilities of a pick: the chosen token's and the most likely tokens', from the
//! model's own logits (log-softmax, before temperature, biases and penalties).

/// The log-probabilities reported with a pick.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's.
    pub logprob: f32,
    /// The most likely tokens, most likely first (ties: the lower id first), with theirs.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// `token`'s log-probability under `logits`, and the `k` most likely tokens'.
    pub fn of(logits: &[f32], token: u32, k: u32) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
        let lse = max + sum.ln() as f32;
        let lp = |id: u32| {
            logits
                .get(id as usize)
                .map_or(f32::NEG_INFINITY, |v| v - lse)
        };
        // The k best in one pass, kept sorted (k is at most 20): no vocabulary-sized buffer
        // per token.
        let k = (k as usize).min(logits.len());
        let mut idx: Vec<u32> = Vec::with_capacity(k + 1);
        if k > 0 {
            for (i, &v) in logits.iter().enumerate() {
                if idx.len() == k && v <= logits[idx[k - 1] as usize] {
                    continue;
                }
                let at = idx.partition_point(|&j| logits[j as usize] >= v);
                idx.insert(at, i as u32);
                idx.truncate(k);
            }
        }
        TokenLogprobs {
            logprob: lp(token),
            top: idx.into_iter().map(|i| (i, lp(i))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_the_top_k() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let l = TokenLogprobs::of(&logits, 2, 3);
        let z: f32 = logits.iter().map(|v| v.exp()).sum();
        let want = |v: f32| v - z.ln();
        assert!((l.logprob - want(1.0)).abs() < 1e-6);
        let ids: Vec<u32> = l.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert!((l.top[0].1 - want(2.0)).abs() < 1e-6);
        let total: f32 = logits.iter().map(|&v| want(v).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(TokenLogprobs::of(&logits, 0, 0).top.is_empty());
        assert_eq!(TokenLogprobs::of(&logits, 0, 9).top.len(), 4);
    }
}
