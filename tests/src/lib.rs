//! Helpers shared by the cross-process and model tests.

use std::path::PathBuf;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The default model, `$MODEL_PATH` or `models/SmolLM2-135M-Instruct.Q4_1.gguf`.
///
/// Panics with the fix when it is missing: these tests must not pass by skipping.
pub fn default_model() -> PathBuf {
    let p = std::env::var_os("MODEL_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        p.exists(),
        "model {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}
