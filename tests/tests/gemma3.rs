//! Gemma 3 270M (Q4_K_M, SentencePiece with 262k pieces, sliding-window attention):
//! tokenizer, chat format and greedy ids against llama.cpp; the same logits however the
//! layers are split; and the same text through a three-node cluster as in one process.

use std::sync::Mutex;

use candle_core::Device;
use common::device::init_threads;
use common::generate::LocalPipeline;
use common::gguf::GgufFile;
use common::model::LayerRange;
use common::tokenizer::TextTokenizer;
use integration_tests::{
    completion, gemma3_model, generate, reference, CoordinatorProcess, ShardProcess,
};

/// The tests each take both cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn tokenizer_chat_format_and_greedy_ids_match_llama_cpp() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    init_threads(None)?;
    let c = reference::check(&gemma3_model(), "tests/fixtures/gemma3_reference.json")?;
    assert!(c.strings >= 20, "only {} tokenizer strings", c.strings);
    assert!(
        c.free >= 40 && c.forced >= 80,
        "too few steps compared: {c:?}"
    );
    Ok(())
}

/// Layers 5, 11 and 17 attend to everything, the others through a window of 512. Cuts after
/// a local layer (3), before a global one (5) and after it (6) give the one-stage logits, for a
/// prompt long enough that the local layers' caches wrap around.
#[test]
fn split_on_global_and_local_layers_is_invariant() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    init_threads(None)?;
    let file = GgufFile::open(gemma3_model())?;
    let cfg = file.config()?;
    assert_eq!(cfg.n_layers, 18);
    assert_eq!(
        (0..18)
            .filter(|&i| cfg.window_of(i).is_none())
            .collect::<Vec<_>>(),
        [5, 11, 17]
    );
    let tok = TextTokenizer::from_gguf(&file)?;
    let one = LocalPipeline::load(&file, &[LayerRange::full(18)?], &Device::Cpu, 1024)?;
    let split = LocalPipeline::load(
        &file,
        &LayerRange::from_cuts(&[3, 5, 6], 18)?,
        &Device::Cpu,
        1024,
    )?;
    let text: String = (0..70)
        .map(|i| format!("Line {i}: the value is {}.\n", i * 37 % 101))
        .collect();
    let ids = tok.encode(&text)?;
    assert!(ids.len() > 800, "prompt of {} tokens", ids.len());
    let (mut s1, mut s4) = (one.session(1024)?, split.session(1024)?);
    let a = one.prefill(&mut s1, &ids)?;
    let b = split.prefill(&mut s4, &ids)?;
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        diff(&a, &b) <= 1e-3,
        "prompt logits differ by {}",
        diff(&a, &b)
    );
    for t in [42u32, 7, 1000, 3] {
        let a = one.decode(&mut s1, t)?;
        let b = split.decode(&mut s4, t)?;
        assert!(
            diff(&a, &b) <= 1e-3,
            "decode logits differ by {}",
            diff(&a, &b)
        );
    }
    Ok(())
}

#[test]
fn three_node_cluster_gives_the_single_process_text() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let model = gemma3_model();
    let dir = model.parent().ok_or_else(|| anyhow::anyhow!("no folder"))?;
    let nodes: Vec<ShardProcess> = (0..3)
        .map(|_| ShardProcess::spawn(dir, &[]))
        .collect::<Result<_, _>>()?;
    let coord = CoordinatorProcess::spawn(&model, &nodes.iter().collect::<Vec<_>>())?;
    for prompt in ["The capital of France is", "def add(a, b):\n"] {
        let want = generate(&model, prompt, 24)?;
        assert!(!want.is_empty());
        assert_eq!(
            completion(&coord.url, prompt, 24, false)?,
            want,
            "{prompt:?}"
        );
        assert_eq!(
            completion(&coord.url, prompt, 24, true)?,
            want,
            "{prompt:?} streamed"
        );
    }
    Ok(())
}
