//! Stages [0,10), [10,20), [20,30) chained in one process give the same logits as one
//! [0,30) stage, for the prompt and for decode steps.

use candle_core::Device;
use common::device::init_threads;
use common::generate::LocalPipeline;
use common::gguf::GgufFile;
use common::model::LayerRange;
use common::tokenizer::TextTokenizer;
use integration_tests::default_model;

#[test]
fn three_stages_equal_one() -> anyhow::Result<()> {
    init_threads(None)?;
    let file = GgufFile::open(default_model())?;
    let tok = TextTokenizer::from_gguf(&file)?;
    let one = LocalPipeline::load(&file, &[LayerRange::new(0, 30)?], &Device::Cpu, 512)?;
    let three = LocalPipeline::load(
        &file,
        &[
            LayerRange::new(0, 10)?,
            LayerRange::new(10, 20)?,
            LayerRange::new(20, 30)?,
        ],
        &Device::Cpu,
        512,
    )?;
    assert_eq!(three.stages().len(), 3);
    assert!(three.stages()[0].is_first() && !three.stages()[0].is_last());
    assert!(!three.stages()[1].is_first() && !three.stages()[1].is_last());
    assert!(three.stages()[2].is_last());

    let ids =
        tok.encode("Split invariance: the same model, cut in three, must give the same numbers.")?;
    let (mut s1, mut s3) = (one.session(512)?, three.session(512)?);
    let a = one.logits(&mut s1, &ids, true)?;
    let b = three.logits(&mut s3, &ids, true)?;
    assert_eq!(a.dims(), [ids.len(), 49152]);
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff <= 1e-4, "prompt logits differ by {diff}");
    for t in [42u32, 7, 1000, 3] {
        let a = one.logits(&mut s1, &[t], false)?;
        let b = three.logits(&mut s3, &[t], false)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-4, "decode logits differ by {diff}");
    }
    Ok(())
}
