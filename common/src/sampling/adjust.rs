//! What changes the logits before a pick: OpenAI's logit biases and presence and frequency
//! penalties, and the repetition penalty of vLLM and Hugging Face, from the tokens a session
//! has generated (and, for the repetition penalty, its prompt).

use std::collections::{HashMap, HashSet};

use super::SamplingParams;

/// The tokens a session has seen.
#[derive(Debug, Default)]
pub struct History {
    /// Generated tokens, and how often each.
    generated: HashMap<u32, u32>,
    /// The prompt's distinct tokens (kept only for the repetition penalty).
    prompt: HashSet<u32>,
}

impl History {
    /// Remembers the prompt's tokens.
    pub fn prompt(&mut self, ids: &[u32]) {
        self.prompt.extend(ids.iter().copied());
    }

    /// Remembers a generated token.
    pub fn push(&mut self, token: u32) {
        *self.generated.entry(token).or_default() += 1;
    }

    /// Applies `p`'s biases and penalties to `logits`, in that order: a token's logit gets
    /// its bias, then less `frequency_penalty` per time it was generated and
    /// `presence_penalty` once if it was, then, if it is in the prompt or was generated, is
    /// divided by `repetition_penalty` when positive and multiplied by it when not. Tokens
    /// outside `logits` are ignored (the coordinator refuses biases on them).
    pub fn adjust(&self, p: &SamplingParams, logits: &mut [f32]) {
        for &(id, b) in &p.logit_bias {
            if let Some(v) = logits.get_mut(id as usize) {
                *v += b;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &n) in &self.generated {
                if let Some(v) = logits.get_mut(id as usize) {
                    *v -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
        let r = p.repetition_penalty;
        if r != 1.0 {
            let seen = self
                .prompt
                .iter()
                .chain(self.generated.keys().filter(|id| !self.prompt.contains(id)));
            for &id in seen {
                if let Some(v) = logits.get_mut(id as usize) {
                    *v = if *v > 0.0 { *v / r } else { *v * r };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn biases_and_penalties_follow_their_definitions() {
        let mut h = History::default();
        h.prompt(&[3]);
        for t in [1, 1, 2] {
            h.push(t);
        }
        let p = SamplingParams {
            logit_bias: vec![(0, -5.0), (9, 1.0)],
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::default()
        };
        let mut v = vec![1.0, 1.0, 1.0, 1.0];
        h.adjust(&p, &mut v);
        // token 0: biased; 1: twice generated; 2: once; 3: only in the prompt (no penalty
        // but the repetition one, which is off); bias on 9 is outside and ignored
        assert_eq!(v, [-4.0, 1.0 - 0.5 - 0.5, 1.0 - 0.25 - 0.5, 1.0]);
        let r = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        };
        let mut v = vec![4.0, 4.0, -4.0, 4.0, 4.0];
        h.adjust(&r, &mut v);
        assert_eq!(v, [4.0, 2.0, -8.0, 2.0, 4.0]);
    }
}
