//! Greedy output matches llama.cpp on the same file (tests/fixtures/llama_cpp_reference.json,
//! made by scripts/llama-reference.py); the checks are in `integration_tests::reference`.
//!
//! Prompt ids and the rendered chat template must be identical. Generated ids must be
//! identical at every step where llama.cpp's top-2 logit margin is at least
//! [`reference::NEAR_TIE`]: free-running up to the first near-tie, and teacher-forced on
//! llama.cpp's tokens for the whole reference.
//!
//! Why 0.5 and not 0.1: with Q4_1 weights and 8-bit activation quantization this model is
//! chaotic at the last bit. Reordering one f32 sum inside the attention of *this* engine
//! moves logits by up to 0.6, and llama.cpp's own f16-KV and f32-KV configurations differ
//! from each other by up to 1.2 on the same prompt (docs/correctness.md). Our matmuls are
//! bit-identical to llama.cpp (position 0 logits agree to 1e-4); attention differs only in
//! summation order and exp, and 0.5 is the smallest threshold that stays above that floor.

use common::device::init_threads;
use integration_tests::{default_model, reference};

#[test]
fn tokenizer_and_greedy_ids_match_llama_cpp() -> anyhow::Result<()> {
    init_threads(None)?;
    let c = reference::check(&default_model(), "tests/fixtures/llama_cpp_reference.json")?;
    assert!(c.free >= 60 && c.forced >= 150, "too few steps compared");
    Ok(())
}
