//! [`LayerRange`]: which transformer blocks a stage owns.

use std::fmt;

use crate::error::{Error, Result};

/// A half-open range of transformer block indices, `[start, end)`, never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerRange {
    start: u32,
    end: u32,
}

impl LayerRange {
    /// A checked range: `start < end`.
    pub fn new(start: u32, end: u32) -> Result<Self> {
        if start >= end {
            return Err(Error::BadLayerRange(format!("[{start}, {end}) is empty")));
        }
        Ok(LayerRange { start, end })
    }

    /// The whole model.
    pub fn full(n_layers: usize) -> Result<Self> {
        let end = u32::try_from(n_layers)
            .map_err(|_| Error::BadLayerRange(format!("{n_layers} layers")))?;
        Self::new(0, end)
    }

    /// Consecutive stages cut at `cuts` (ascending), covering `[0, n_layers)`:
    /// `from_cuts(&[10, 20], 30)` is `[0,10) [10,20) [20,30)`.
    pub fn from_cuts(cuts: &[u32], n_layers: usize) -> Result<Vec<Self>> {
        let end = u32::try_from(n_layers)
            .map_err(|_| Error::BadLayerRange(format!("{n_layers} layers")))?;
        let mut start = 0;
        let mut ranges = Vec::with_capacity(cuts.len() + 1);
        for &c in cuts.iter().chain([end].iter()) {
            ranges.push(Self::new(start, c)?.check(n_layers)?);
            start = c;
        }
        Ok(ranges)
    }

    /// Checks that the range lies within a model of `n_layers` blocks.
    pub fn check(self, n_layers: usize) -> Result<Self> {
        if self.end as usize > n_layers {
            return Err(Error::BadLayerRange(format!(
                "{self} goes past the model's {n_layers} layers"
            )));
        }
        Ok(self)
    }

    /// First block.
    pub fn start(self) -> u32 {
        self.start
    }

    /// One past the last block.
    pub fn end(self) -> u32 {
        self.end
    }

    /// Number of blocks.
    pub fn len(self) -> usize {
        (self.end - self.start) as usize
    }

    /// Always false: ranges are never empty.
    pub fn is_empty(self) -> bool {
        false
    }

    /// Whether this stage runs the embedding (it owns block 0).
    pub fn is_first(self) -> bool {
        self.start == 0
    }

    /// Whether this stage runs the head, in a model of `n_layers` blocks.
    pub fn is_last(self, n_layers: usize) -> bool {
        self.end as usize == n_layers
    }

    /// Block indices.
    pub fn iter(self) -> impl Iterator<Item = u32> {
        self.start..self.end
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

impl std::str::FromStr for LayerRange {
    type Err = Error;

    /// Parses `START..END`.
    fn from_str(s: &str) -> Result<Self> {
        let (a, b) = s
            .split_once("..")
            .ok_or_else(|| Error::BadLayerRange(format!("`{s}` is not START..END")))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| Error::BadLayerRange(format!("`{s}` is not START..END")))
        };
        Self::new(parse(a)?, parse(b)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert!(LayerRange::new(3, 3).is_err());
        assert!(LayerRange::new(4, 3).is_err());
        let r: LayerRange = "10..20".parse().expect("valid");
        assert_eq!((r.start(), r.end(), r.len()), (10, 20, 10));
        assert!(r.check(30).is_ok());
        assert!(r.check(15).is_err());
        assert!("10-20".parse::<LayerRange>().is_err());
        assert!(r.is_last(20) && !r.is_first());
        let cut = LayerRange::from_cuts(&[10, 20], 30).expect("valid cuts");
        assert_eq!(
            cut.iter().map(|r| (r.start(), r.end())).collect::<Vec<_>>(),
            [(0, 10), (10, 20), (20, 30)]
        );
        assert_eq!(LayerRange::from_cuts(&[], 30).expect("no cuts").len(), 1);
        assert!(LayerRange::from_cuts(&[20, 10], 30).is_err());
        assert!(LayerRange::from_cuts(&[40], 30).is_err());
    }
}
