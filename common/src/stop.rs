//! Stop strings over streamed text: text that could still become a stop string is held
//! back, and nothing from the stop string on is ever released.

/// Watches streamed text for any of a set of stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    hit: bool,
}

impl StopMatcher {
    /// Matches `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Default::default()
        }
    }

    /// Adds a piece; returns the text that is safe to release, and whether a stop string
    /// was found (then nothing more is released).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.hit {
            return (String::new(), true);
        }
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            self.hit = true;
            return (out, true);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Whether a stop string was found.
    pub fn hit(&self) -> bool {
        self.hit
    }

    /// Releases what was held back (at the end of generation).
    pub fn flush(&mut self) -> String {
        if self.hit {
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_and_cuts_at_stop() {
        let mut m = StopMatcher::new(&["END".to_string(), "\n\n".to_string()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("X more"), ("ENX more".to_string(), false));
        assert_eq!(m.push(" x\n"), (" x".to_string(), false));
        assert_eq!(m.push("\nafter"), (String::new(), true));
        assert_eq!(m.flush(), "");
        let mut m = StopMatcher::new(&["zz".to_string()]);
        assert_eq!(m.push("az"), ("a".to_string(), false));
        assert_eq!(m.flush(), "z");
    }
}
