//! The planner: layers split across nodes in proportion to their free memory.

use common::model::LayerRange;

use crate::error::{CoordError, Result};

/// Splits `layer_bytes.len()` layers over nodes with `free` bytes each, in proportion to
/// `free`, every node getting at least one layer. `first_extra` and `last_extra` are the
/// embedding and head bytes the first and last node hold too. A split that does not fit
/// every node is refused, naming each node that is short and by how much.
pub fn split(
    layer_bytes: &[u64],
    free: &[u64],
    first_extra: u64,
    last_extra: u64,
) -> Result<Vec<LayerRange>> {
    let n = layer_bytes.len();
    let k = free.len();
    if k == 0 {
        return Err(CoordError::Plan("no nodes".into()));
    }
    if k > n {
        return Err(CoordError::Plan(format!("{k} nodes for {n} layers")));
    }
    let total: u128 = free.iter().map(|&f| u128::from(f)).sum();
    let mut counts: Vec<usize> = free
        .iter()
        .map(|&f| {
            (u128::from(f) * n as u128)
                .checked_div(total)
                .map_or(1, |c| c as usize)
                .max(1)
        })
        .collect();
    // Fix rounding: add to the nodes with most free memory, take from those with most layers.
    while counts.iter().sum::<usize>() < n {
        let i = (0..k)
            .max_by_key(|&i| free[i] / (counts[i] as u64 + 1))
            .unwrap_or(0);
        counts[i] += 1;
    }
    while counts.iter().sum::<usize>() > n {
        let i = (0..k)
            .filter(|&i| counts[i] > 1)
            .max_by_key(|&i| counts[i])
            .unwrap_or(0);
        counts[i] -= 1;
    }
    let mut ranges = Vec::with_capacity(k);
    let mut short = Vec::new();
    let mut start = 0usize;
    for (i, &c) in counts.iter().enumerate() {
        let r = LayerRange::new(start as u32, (start + c) as u32)?;
        let mut need: u64 = layer_bytes[start..start + c].iter().sum();
        if i == 0 {
            need += first_extra;
        }
        if i == k - 1 {
            need += last_extra;
        }
        if need > free[i] {
            short.push(format!(
                "node {i} would hold layers {r} ({need} bytes) but has {} bytes free, {} short",
                free[i],
                need - free[i]
            ));
        }
        ranges.push(r);
        start += c;
    }
    if !short.is_empty() {
        return Err(CoordError::Plan(short.join("; ")));
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_and_checked() -> Result<()> {
        let layers = vec![10u64; 30];
        let r = split(&layers, &[1000, 1000, 1000], 5, 5)?;
        assert_eq!(r.iter().map(|r| r.len()).collect::<Vec<_>>(), [10, 10, 10]);
        let r = split(&layers, &[2000, 1000], 0, 0)?;
        assert_eq!(r.iter().map(|r| r.len()).collect::<Vec<_>>(), [20, 10]);
        assert_eq!(r[1].end(), 30);
        assert!(matches!(
            split(&layers, &[100, 100], 0, 0),
            Err(CoordError::Plan(_))
        ));
        assert!(split(&layers[..2], &[100, 100, 100], 0, 0).is_err());
        assert!(split(&layers, &[], 0, 0).is_err());
        Ok(())
    }
}
