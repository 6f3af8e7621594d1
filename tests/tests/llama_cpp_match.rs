//! Greedy output matches llama.cpp on the same file (tests/fixtures/llama_cpp_reference.json,
//! made by scripts/llama-reference.py).
//!
//! Prompt ids and the rendered chat template must be identical. Generated ids must be
//! identical at every step where llama.cpp's top-2 logit margin is at least [`NEAR_TIE`]:
//! free-running up to the first near-tie, and teacher-forced on llama.cpp's tokens for the
//! whole reference.
//!
//! Why 0.5 and not 0.1: with Q4_1 weights and 8-bit activation quantization this model is
//! chaotic at the last bit. Reordering one f32 sum inside the attention of *this* engine
//! moves logits by up to 0.6, and llama.cpp's own f16-KV and f32-KV configurations differ
//! from each other by up to 1.2 on the same prompt (docs/correctness.md). Our matmuls are
//! bit-identical to llama.cpp (position 0 logits agree to 1e-4); attention differs only in
//! summation order and exp, and 0.5 is the smallest threshold that stays above that floor.

use common::device::init_threads;
use common::generate::LocalPipeline;
use common::gguf::GgufFile;
use common::model::LayerRange;
use common::sampling::argmax;
use common::tokenizer::{ChatMessage, TextTokenizer};
use integration_tests::{default_model, workspace_root};
use serde::Deserialize;

/// Margins below this are near-ties, where two correct engines may flip.
const NEAR_TIE: f32 = 0.5;

#[derive(Deserialize)]
struct Reference {
    eog_ids: Vec<u32>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    chat: bool,
    rendered: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    margins: Vec<f32>,
}

fn load_reference() -> anyhow::Result<Reference> {
    let p = workspace_root().join("tests/fixtures/llama_cpp_reference.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
}

#[test]
fn tokenizer_and_greedy_ids_match_llama_cpp() -> anyhow::Result<()> {
    init_threads(None)?;
    let reference = load_reference()?;
    assert!(reference.cases.len() >= 6 && reference.cases.iter().filter(|c| c.chat).count() >= 2);
    let file = GgufFile::open(default_model())?;
    let tok = TextTokenizer::from_gguf(&file)?;
    assert_eq!(
        tok.eog_ids().iter().copied().collect::<Vec<_>>(),
        reference.eog_ids,
        "end-of-generation set"
    );
    let cfg = file.config()?;
    let pipe = LocalPipeline::load(
        &file,
        &[LayerRange::full(cfg.n_layers)?],
        &candle_core::Device::Cpu,
        1024,
    )?;

    let mut compared_free = 0;
    let mut compared_forced = 0;
    for case in &reference.cases {
        let text = if case.chat {
            let rendered =
                tok.apply_chat_template(&[ChatMessage::new("user", case.prompt.clone())])?;
            assert_eq!(
                rendered, case.rendered,
                "chat template rendering for {:?}",
                case.prompt
            );
            rendered
        } else {
            case.prompt.clone()
        };
        let ids = tok.encode(&text)?;
        assert_eq!(ids, case.prompt_ids, "prompt ids for {:?}", case.prompt);

        // Free-running greedy decode: identical up to llama.cpp's first near-tie.
        let mut sess = pipe.session(1024)?;
        let mut logits = pipe.prefill(&mut sess, &ids)?;
        for (step, (&want, &margin)) in case.generated_ids.iter().zip(&case.margins).enumerate() {
            if margin < NEAR_TIE {
                break;
            }
            let got = argmax(&logits);
            assert_eq!(
                got, want,
                "{:?}: step {step} (llama.cpp margin {margin})",
                case.prompt
            );
            compared_free += 1;
            if tok.is_eog(got) {
                break;
            }
            logits = pipe.decode(&mut sess, got)?;
        }

        // Teacher-forced on llama.cpp's own tokens: every step that is not a near-tie agrees.
        let mut sess = pipe.session(1024)?;
        let mut logits = pipe.prefill(&mut sess, &ids)?;
        for (step, (&want, &margin)) in case.generated_ids.iter().zip(&case.margins).enumerate() {
            if margin >= NEAR_TIE {
                assert_eq!(
                    argmax(&logits),
                    want,
                    "{:?}: forced step {step} (margin {margin})",
                    case.prompt
                );
                compared_forced += 1;
            }
            if tok.is_eog(want) {
                break;
            }
            logits = pipe.decode(&mut sess, want)?;
        }
    }
    eprintln!("compared {compared_free} free-running and {compared_forced} teacher-forced steps");
    assert!(
        compared_free >= 60 && compared_forced >= 150,
        "too few steps compared"
    );
    Ok(())
}
