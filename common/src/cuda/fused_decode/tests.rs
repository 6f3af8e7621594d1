//! Tests of [`super`] on a CUDA device.

use candle_core::{Device, Tensor};

use super::*;
use crate::cuda::decode_graph;
use crate::gguf::GgufFile;
use crate::model::{KvCache, KvDtype, LayerRange, Stage};

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let n = b.sqr()?.sum_all()?.to_scalar::<f32>()?;
    Ok((d / n.max(1e-30)).sqrt())
}

/// Decode steps through the fused path against the block-by-block path, on the default
/// model (`LLMC_TEST_MODEL`, else `models/` of the workspace; the test fails without it):
/// its first two blocks, 12 sessions prefilled to different depths, then steps of all 12
/// (more rows than mmvq takes: mmq), of one and of five (mmvq). Each step's hidden states
/// agree to within the rounding of the two paths, so the caches they wrote agree too. Needs a
/// GPU: run the test binary of a `cuda` build on the GPU machine.
#[test]
fn fused_steps_match_block_forward() -> Result<()> {
    check_fused_steps(&default_model(), 1e-4)
}

fn default_model() -> String {
    std::env::var("LLMC_TEST_MODEL").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .into()
    })
}

/// As [`fused_steps_match_block_forward`], on synthetic Q4_0 and Q8_0 models whose widths
/// our matrix-vector kernels take (`matvec.rs`), so their products are checked too: rows
/// of 24 blocks (less than one pass) and of 136 (a pass and a tail).
#[test]
#[cfg(feature = "synth")]
fn fused_steps_match_block_forward_with_our_matvec() -> Result<()> {
    use crate::gguf::synth::{self, SynthQuant, SynthSpec};
    let tokenizer = GgufFile::open(default_model())?;
    let dir = tempfile::tempdir().map_err(|e| Error::InvalidInput(e.to_string()))?;
    for quant in [SynthQuant::Q4_0, SynthQuant::Q8_0] {
        let spec = SynthSpec {
            context: 512,
            quant,
            seed: 7,
            ..SynthSpec::llama(2, 768, 4352, 12, 4)
        };
        let path = dir.path().join(format!("{quant:?}.gguf"));
        synth::write(&spec, &tokenizer, &path)?;
        let file = GgufFile::open(&path)?;
        let stage = Stage::load(&file, LayerRange::new(0, 2)?, &Device::new_cuda(0)?, 256)?;
        let parts = stage.parts().0[0]
            .fused_parts()
            .ok_or_else(|| Error::InvalidInput("no fused parts".into()))?;
        for l in parts
            .qkv
            .iter()
            .copied()
            .chain([parts.o, parts.gate_up, parts.down])
        {
            let w = l.weight();
            if MatvecType::of(w.dtype(), l.in_features(), w.device_ptr()? as u64).is_none() {
                return Err(Error::InvalidInput(format!(
                    "{quant:?}: our matvec does not take a weight of {:?}, width {}",
                    w.dtype(),
                    l.in_features()
                )));
            }
        }
        eprintln!("{quant:?}:");
        // Our kernels sum each product in another order than candle's mmvq, so every row
        // carries last-bit differences into the next quantization, and most rows see a few
        // values flip a step (on the H100: median 5.8e-4, worst 3.7e-3 relative error).
        // A wrong product moves a row by about 1.
        check_fused_steps(path.to_str().unwrap_or_default(), 5e-3)?;
    }
    Ok(())
}

/// One decode row for each cache of `set` whose index is in `who` (ascending), with room
/// reserved.
fn decode_segments<'a>(set: &'a mut [KvCache], who: &[usize]) -> Result<Vec<Segment<'a>>> {
    let mut segs: Vec<Segment<'a>> = set
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| who.contains(i))
        .map(|(_, c)| {
            let start = c.len();
            Segment {
                cache: c,
                start,
                len: 1,
            }
        })
        .collect();
    for g in segs.iter_mut() {
        g.cache.reserve(1)?;
    }
    Ok(segs)
}

/// Decode steps replayed from graphs against the same steps launched kernel by kernel,
/// on the first two blocks of the default model: batches of 1 to 6 sessions, coming and
/// going between steps, whose longest context crosses 64 rows (the attention's second
/// split, so a bucket captures a second graph). The same kernels run on the same inputs, so
/// every output must be the same to the bit. Needs a GPU.
#[test]
fn graph_steps_match_launched_steps() -> Result<()> {
    let file = GgufFile::open(default_model())?;
    let dev = Device::new_cuda(0)?;
    let stage = Stage::load(&file, LayerRange::new(0, 2)?, &dev, 256)?;
    let (blocks, rope) = stage.parts();
    let n = 6;
    let mut caches: [Vec<KvCache>; 2] = [Vec::new(), Vec::new()];
    for i in 0..n {
        let prompt: Vec<u32> = (0..58 + i)
            .map(|t| ((t * 29 + i * 7) % 900 + 20) as u32)
            .collect();
        let x = stage.embed(&prompt)?;
        for set in caches.iter_mut() {
            let mut c = stage.new_cache(256, KvDtype::F16)?;
            stage.forward(&x, &mut c, 0)?;
            set.push(c);
        }
    }
    let before = decode_graph::stats();
    let schedules: Vec<Vec<usize>> = vec![
        (0..n).collect(),
        vec![2],
        vec![0, 1, 2],
        (0..n).collect(),
        vec![2],
        vec![5],
        (0..n).collect(),
        vec![0, 3, 5],
        (0..n).collect(),
        (0..n).collect(),
        vec![5],
    ];
    let mut steps = 0;
    for (step, who) in schedules.iter().enumerate() {
        let ids: Vec<u32> = who
            .iter()
            .map(|&i| (i * 41 + step * 13 + 3) as u32)
            .collect();
        let x = stage.embed(&ids)?;
        let mut outs = Vec::new();
        for (set, graphs) in caches.iter_mut().zip([true, false]) {
            let mut segs = decode_segments(set, who)?;
            let y = forward_with(blocks, &x, &mut segs, rope, graphs)?.ok_or_else(|| {
                Error::InvalidInput("the fused path did not take a decode step".into())
            })?;
            for g in segs.iter_mut() {
                g.cache.advance(1);
            }
            outs.push(y.flatten_all()?.to_vec1::<f32>()?);
        }
        steps += 1;
        let differ = outs[0]
            .iter()
            .zip(&outs[1])
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        eprintln!("step {step}, sessions {who:?}: {differ} values differ");
        if differ > 0 {
            return Err(Error::InvalidInput(format!(
                "step {step}: {differ} of {} values differ between the graph and the launches",
                outs[0].len()
            )));
        }
    }
    let after = decode_graph::stats();
    eprintln!("graphs: {before:?} -> {after:?}");
    // Batches of 6, 1 and 3 rows. The longest context passes 64 rows at step 3, so the
    // split count goes from 1 to 2 there: each of the six (rows, splits) pairs met is
    // launched directly the first time (steps 0, 1, 2, 3, 4 and 7); (1, 2) is captured
    // at step 5 and (6, 2) at step 6, and both replayed from then on (steps 5, 6, 8, 9,
    // 10): 6 direct steps, 2 captures, 5 replays.
    let (replays, direct, captures) = (
        after.replays - before.replays,
        after.direct - before.direct,
        after.captures - before.captures,
    );
    if steps != 11 || (direct, captures, replays) != (6, 2, 5) {
        return Err(Error::InvalidInput(format!(
            "expected 6 direct steps, 2 captures and 5 replays of 11: {before:?} -> {after:?}"
        )));
    }
    decode_graph::release();
    let released = decode_graph::stats();
    if released.buckets != 0 || released.bytes != 0 {
        return Err(Error::InvalidInput(format!(
            "buckets left after release: {released:?}"
        )));
    }
    Ok(())
}

/// Decode steps as described above; fails where the median row's relative error passes
/// `median_limit` or any row's passes 0.1.
fn check_fused_steps(path: &str, median_limit: f32) -> Result<()> {
    let file = GgufFile::open(path)?;
    let dev = Device::new_cuda(0)?;
    // Two blocks: a wrong kernel shows as an error near 1, while rounding differences stay
    // small (through all 30 blocks they compound to several percent of the hidden state).
    let stage = Stage::load(&file, LayerRange::new(0, 2)?, &dev, 256)?;
    let (blocks, rope) = stage.parts();
    let n = 12;
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            (0..3 + 5 * i)
                .map(|t| ((t * 37 + i * 101) % 1000 + 10) as u32)
                .collect()
        })
        .collect();
    let mut fused: Vec<KvCache> = Vec::new();
    let mut plain: Vec<KvCache> = Vec::new();
    for p in &prompts {
        let x = stage.embed(p)?;
        for set in [&mut fused, &mut plain] {
            let mut c = stage.new_cache(256, KvDtype::F16)?;
            stage.forward(&x, &mut c, 0)?;
            set.push(c);
        }
    }
    let mut tokens: Vec<u32> = (0..n).map(|i| (i * 53 + 7) as u32).collect();
    let schedules: Vec<Vec<usize>> = vec![
        (0..n).collect(),
        (0..n).collect(),
        (0..n).collect(),
        vec![3],
        vec![3],
        vec![0, 2, 5, 8, 11],
        (0..n).collect(),
    ];
    let mut all = Vec::new();
    for (step, who) in schedules.iter().enumerate() {
        let ids: Vec<u32> = who.iter().map(|&i| tokens[i]).collect();
        let x = stage.embed(&ids)?;
        // `who` is ascending, so the segments come in its order.
        let run = |set: &mut Vec<KvCache>, fuse: bool| -> Result<Tensor> {
            let mut segs = decode_segments(set, who)?;
            let y = if fuse {
                forward(blocks, &x, &mut segs, rope)?.ok_or_else(|| {
                    Error::InvalidInput("the fused path did not take a decode step".into())
                })?
            } else {
                let mut y = x.clone();
                for (li, b) in blocks.iter().enumerate() {
                    y = b.forward(&y, &mut segs, li, rope)?;
                }
                y
            };
            for g in segs.iter_mut() {
                g.cache.advance(1);
            }
            Ok(y)
        };
        let yf = run(&mut fused, true)?;
        let yp = run(&mut plain, false)?;
        let errs = (0..who.len())
            .map(|r| rel_err(&yf.get(r)?, &yp.get(r)?))
            .collect::<Result<Vec<f32>>>()?;
        eprintln!("step {step}, sessions {who:?}: relative errors {errs:?}");
        all.extend(errs);
        for &i in who {
            tokens[i] = (tokens[i] * 31 + 17 + step as u32) % 1000 + 5;
        }
    }
    // Both paths quantize activations to 8 bits. Where their sums round differently in
    // the last bit, a value can land on the other side of a quantization step, and that
    // flip carries on: such rows differ by up to a few percent, the others by ~1e-7. A
    // wrong kernel moves every row, by far more.
    all.sort_by(f32::total_cmp);
    let (median, worst) = (all[all.len() / 2], all[all.len() - 1]);
    eprintln!("fused against block-by-block: median relative error {median:e}, worst {worst:e}");
    if median > median_limit || worst > 0.1 {
        return Err(Error::InvalidInput(format!(
            "the paths differ: median relative error {median}, worst {worst}"
        )));
    }
    Ok(())
}
