//! Tests of [`super`] on a CUDA device.

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::model::attention::attention;
use crate::model::kv_cache::{KvCache, KvDtype};

fn random(rows: usize, width: usize, salt: f32, dev: &Device) -> Result<Tensor> {
    let d: Vec<f32> = (0..rows * width)
        .map(|i| (i as f32 * 0.37 + salt * 1.7).sin() * 1.3)
        .collect();
    Ok(Tensor::from_vec(d, (rows, width), dev)?)
}

/// Sessions at different depths, one decode row each: the kernels' output and the rows they
/// write into the caches equal what candle's rope, cache write and attention give per
/// session. The kernels run on another thread than the one that made the device, as on a
/// node's compute thread. Needs a GPU: run the test binary of a `cuda` build on the GPU
/// machine.
#[test]
fn kernels_match_candle_ops_per_session() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    std::thread::spawn(move || compare_on(&dev))
        .join()
        .map_err(|_| Error::InvalidInput("the test thread panicked".into()))?
}

/// A step mixing decode rows and prefill chunks gives, row for row, what candle's ops
/// give for each session alone, and leaves the same rows in the caches.
#[test]
fn mixed_steps_match_candle_ops_per_session() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let s = AttnShape {
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
    };
    let (width, kvw) = (s.heads * 64, s.kv_heads * 64);
    let rope = Rope::new(RopeStyle::Halves, 64, 10000.0, 300, &dev)?;
    // (cached before, new rows): decode, prefill, decode, chunk, decode
    let plan = [(5usize, 1usize), (0, 7), (37, 1), (10, 4), (0, 1)];
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for (i, &(d, len)) in plan.iter().enumerate() {
        for set in [&mut ours, &mut theirs] {
            let mut c = KvCache::new(1, kvw, 300, KvDtype::F16, &dev)?;
            c.reserve(d + len)?;
            if d > 0 {
                let h = random(d, kvw, i as f32, &dev)?;
                c.write(0, 0, &h, &(h.clone() * 0.5)?)?;
                c.advance(d);
            }
            set.push(c);
        }
    }
    let n: usize = plan.iter().map(|p| p.1).sum();
    let (q, k, v) = (
        random(n, width, 21.0, &dev)?,
        random(n, kvw, 22.0, &dev)?,
        random(n, kvw, 23.0, &dev)?,
    );
    let rows = StepRows {
        q: &q,
        k: &k,
        v: &v,
        layer: 0,
        rope: &rope,
        shape: s,
        window: None,
    };
    fn segs_of<'a>(caches: &'a mut [KvCache], plan: &[(usize, usize)]) -> Vec<Segment<'a>> {
        caches
            .iter_mut()
            .zip(plan)
            .map(|(c, &(start, len))| Segment {
                cache: c,
                start,
                len,
            })
            .collect()
    }
    let reference = attend_each(rows, &mut segs_of(&mut theirs, &plan))?;
    let got = attend_mixed(rows, &mut segs_of(&mut ours, &plan))?
        .ok_or_else(|| Error::InvalidInput("the kernels took no row".into()))?;
    let diff = max_diff(&got, &reference)?;
    assert!(diff < 1e-3, "mixed step differs by {diff}");
    same_caches(&ours, &theirs, "mixed step")
}

/// The largest absolute difference, in f32.
fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?)
}

/// Layer 0 of each pair of caches holds the same keys and values.
fn same_caches(ours: &[KvCache], theirs: &[KvCache], what: &str) -> Result<()> {
    for (a, b) in ours.iter().zip(theirs) {
        let ((ka, va), (kb, vb)) = (a.buffers(0)?, b.buffers(0)?);
        for d in [max_diff(ka, kb)?, max_diff(va, vb)?] {
            assert!(d < 1e-3, "{what}: cache rows differ by {d}");
        }
    }
    Ok(())
}

fn compare_on(dev: &Device) -> Result<()> {
    let dev = dev.clone();
    // Widths of 64 and 128 take their own kernels, 96 the generic one, and heads of 128 in
    // groups of 2, 4 or 8 the grouped kernel (8 query heads over 8 key/value heads keep
    // the per-head one); past 64 cached rows a head's rows are split over CTAs (the
    // deepest sessions here take 11 splits, the shallow ones leave most of theirs empty).
    for (style, hd, kv_heads) in [
        (RopeStyle::Halves, 64, 2),
        (RopeStyle::Interleaved, 128, 2),
        (RopeStyle::Halves, 128, 4),
        (RopeStyle::Halves, 128, 1),
        (RopeStyle::Halves, 128, 8),
        (RopeStyle::Halves, 96, 2),
    ] {
        let s = AttnShape {
            heads: 8,
            kv_heads,
            head_dim: hd,
        };
        let (width, kvw) = (s.heads * hd, s.kv_heads * hd);
        let rope = Rope::new(style, hd, 10000.0, 700, &dev)?;
        let depths = [0usize, 1, 5, 37, 300, 640];
        let n = depths.len();
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for (i, &d) in depths.iter().enumerate() {
            for set in [&mut ours, &mut theirs] {
                let mut c = KvCache::new(1, kvw, 700, KvDtype::F16, &dev)?;
                c.reserve(d + 1)?;
                if d > 0 {
                    let h = random(d, kvw, i as f32, &dev)?;
                    c.write(0, 0, &h, &(h.clone() * 0.5)?)?;
                    c.advance(d);
                }
                set.push(c);
            }
        }
        let (q, k, v) = (
            random(n, width, 11.0, &dev)?,
            random(n, kvw, 12.0, &dev)?,
            random(n, kvw, 13.0, &dev)?,
        );
        let mut reference = Vec::new();
        for (i, (c, &d)) in theirs.iter_mut().zip(&depths).enumerate() {
            let row = |t: &Tensor| t.narrow(0, i, 1);
            let qr = rope.apply(&row(&q)?, s.heads, d)?;
            let kr = rope.apply(&row(&k)?, s.kv_heads, d)?;
            c.write(0, d, &kr, &row(&v)?)?;
            let (kc, vc) = c.buffers(0)?;
            reference.push(attention(&qr, kc, vc, s, d)?);
        }
        let reference = Tensor::cat(&reference, 0)?;
        let mut segs: Vec<Segment<'_>> = ours
            .iter_mut()
            .zip(&depths)
            .map(|(c, &d)| Segment {
                cache: c,
                start: d,
                len: 1,
            })
            .collect();
        assert!(applies(&segs, 0, s));
        let got = attend(
            StepRows {
                q: &q,
                k: &k,
                v: &v,
                layer: 0,
                rope: &rope,
                shape: s,
                window: None,
            },
            &mut segs,
        )?;
        let diff = max_diff(&got, &reference)?;
        assert!(diff < 1e-3, "{style:?}: attention differs by {diff}");
        same_caches(&ours, &theirs, &format!("{style:?}"))?;
    }
    Ok(())
}
