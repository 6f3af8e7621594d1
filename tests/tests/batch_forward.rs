//! Continuous batching changes nothing: a batched forward pass over several sessions gives,
//! bit for bit, the logits each session gets alone.

use candle_core::{Device, Tensor};
use common::gguf::GgufFile;
use common::model::{KvCache, LayerRange, Segment, Stage};
use integration_tests::default_model;

fn logits(stage: &Stage, y: &Tensor) -> anyhow::Result<Vec<f32>> {
    let n = y.dim(0)?;
    Ok(stage
        .head(&y.narrow(0, n - 1, 1)?)?
        .flatten_all()?
        .to_vec1()?)
}

#[test]
fn batched_forward_equals_each_session_alone() -> anyhow::Result<()> {
    let file = GgufFile::open(default_model())?;
    let stage = Stage::load(&file, LayerRange::new(0, 30)?, &Device::Cpu, 512)?;
    let prompts: [&[u32]; 3] = [&[1, 504, 3458, 282], &[9707, 30, 2], &[42; 9]];
    let new_caches = || -> anyhow::Result<Vec<KvCache>> {
        prompts
            .iter()
            .map(|_| Ok(stage.new_cache(512, Default::default())?))
            .collect()
    };
    // Alone: prefill, then one decode step, session by session.
    let mut alone = Vec::new();
    let mut caches = new_caches()?;
    for (p, c) in prompts.iter().zip(&mut caches) {
        let y = stage.forward(&stage.embed(p)?, c, 0)?;
        let prefill = logits(&stage, &y)?;
        let y = stage.forward(&stage.embed(&[7])?, c, p.len())?;
        alone.push((prefill, logits(&stage, &y)?));
    }
    // Batched: all three prefills in one pass, then all three decode steps in one pass.
    let mut caches = new_caches()?;
    let ids: Vec<u32> = prompts.concat();
    let mut segs: Vec<Segment<'_>> = caches
        .iter_mut()
        .zip(prompts)
        .map(|(cache, p)| Segment {
            cache,
            start: 0,
            len: p.len(),
        })
        .collect();
    let y = stage.forward_batch(&stage.embed(&ids)?, &mut segs)?;
    let mut at = 0;
    let mut prefill = Vec::new();
    for p in prompts {
        prefill.push(logits(&stage, &y.narrow(0, at, p.len())?)?);
        at += p.len();
    }
    let mut segs: Vec<Segment<'_>> = caches
        .iter_mut()
        .zip(prompts)
        .map(|(cache, p)| Segment {
            cache,
            start: p.len(),
            len: 1,
        })
        .collect();
    let y = stage.forward_batch(&stage.embed(&[7, 7, 7])?, &mut segs)?;
    for (i, (a_prefill, a_decode)) in alone.iter().enumerate() {
        assert_eq!(&prefill[i], a_prefill, "prefill logits of session {i}");
        assert_eq!(
            &logits(&stage, &y.narrow(0, i, 1)?)?,
            a_decode,
            "decode logits of session {i}"
        );
    }
    Ok(())
}

#[test]
fn a_bad_segment_advances_no_cache() -> anyhow::Result<()> {
    let file = GgufFile::open(default_model())?;
    let stage = Stage::load(&file, LayerRange::new(0, 2)?, &Device::Cpu, 64)?;
    let mut a = stage.new_cache(64, Default::default())?;
    let mut b = stage.new_cache(4, Default::default())?;
    let x = stage.embed(&[1, 2, 3, 4, 5, 6])?;
    let mut segs = [
        Segment {
            cache: &mut a,
            start: 0,
            len: 1,
        },
        Segment {
            cache: &mut b,
            start: 0,
            len: 5,
        }, // over b's bound of 4
    ];
    assert!(stage.forward_batch(&x, &mut segs).is_err());
    let mut segs = [Segment {
        cache: &mut a,
        start: 0,
        len: 2,
    }];
    assert!(
        stage.forward_batch(&x, &mut segs).is_err(),
        "6 rows for a 2-row segment"
    );
    assert_eq!((a.len(), b.len()), (0, 0));
    Ok(())
}
