//! Comparison with llama.cpp's output on a real model file (fixtures made by
//! `scripts/llama-reference.py`): the end-of-generation set, tokenizer ids, the rendered chat
//! template, and greedy ids free-running up to llama.cpp's first near-tie and teacher-forced
//! on llama.cpp's tokens.

use std::path::Path;

use common::generate::LocalPipeline;
use common::gguf::GgufFile;
use common::model::LayerRange;
use common::sampling::argmax;
use common::tokenizer::{ChatMessage, TextTokenizer};
use serde::Deserialize;

/// Margins below this are near-ties, where two correct engines may flip (see
/// tests/tests/llama_cpp_match.rs for why 0.5).
pub const NEAR_TIE: f32 = 0.5;

/// A fixture of `scripts/llama-reference.py`.
#[derive(Deserialize)]
pub struct Reference {
    /// llama.cpp's end-of-generation ids.
    pub eog_ids: Vec<u32>,
    /// Prompts and their greedy continuations.
    pub cases: Vec<Case>,
    /// Strings for the tokenizer alone.
    #[serde(default)]
    pub tokenize: Vec<Tokenized>,
}

/// One prompt.
#[derive(Deserialize)]
pub struct Case {
    /// The text (a user message when `chat`).
    pub prompt: String,
    /// Whether the prompt goes through the chat template.
    pub chat: bool,
    /// The text llama.cpp tokenized.
    pub rendered: String,
    /// llama.cpp's prompt ids.
    pub prompt_ids: Vec<u32>,
    /// llama.cpp's greedy picks.
    pub generated_ids: Vec<u32>,
    /// The top-2 logit margin of each pick.
    pub margins: Vec<f32>,
}

/// A string and llama.cpp's ids for it.
#[derive(Deserialize)]
pub struct Tokenized {
    /// The text.
    pub text: String,
    /// llama.cpp's ids (BOS as the model asks, special tokens parsed).
    pub ids: Vec<u32>,
}

/// Steps compared.
#[derive(Debug, Default)]
pub struct Compared {
    /// Free-running greedy steps equal to llama.cpp's.
    pub free: usize,
    /// Teacher-forced steps equal to llama.cpp's.
    pub forced: usize,
    /// Tokenizer strings with identical ids.
    pub strings: usize,
}

/// Loads `fixture` (relative to the workspace) and checks `model` against it.
pub fn check(model: &Path, fixture: &str) -> anyhow::Result<Compared> {
    let p = crate::workspace_root().join(fixture);
    let reference: Reference = serde_json::from_str(&std::fs::read_to_string(p)?)?;
    let file = GgufFile::open(model)?;
    let tok = TextTokenizer::from_gguf(&file)?;
    assert_eq!(
        tok.eog_ids().iter().copied().collect::<Vec<_>>(),
        reference.eog_ids,
        "end-of-generation set"
    );
    let mut compared = Compared::default();
    for t in &reference.tokenize {
        assert_eq!(tok.encode(&t.text)?, t.ids, "ids of {:?}", t.text);
        compared.strings += 1;
    }
    let cfg = file.config()?;
    let pipe = LocalPipeline::load(
        &file,
        &[LayerRange::full(cfg.n_layers)?],
        &candle_core::Device::Cpu,
        1024,
    )?;
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
            compared.free += 1;
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
                compared.forced += 1;
            }
            if tok.is_eog(want) {
                break;
            }
            logits = pipe.decode(&mut sess, want)?;
        }
    }
    eprintln!("{}: {compared:?}", model.display());
    Ok(compared)
}
