//! For this workspace's tests: where the default model is. Not part of the runtime's API.

use std::path::PathBuf;

/// The default model's file name (`scripts/fetch-model.sh` fetches it into `models/`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Gemma 3 270M, the second real model (`scripts/fetch-model.sh gemma3` fetches it).
pub const GEMMA3_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// The workspace root (the folder above this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The default model: `$MODEL_PATH`, or `models/` of the workspace.
///
/// Panics with the fix when it is missing: tests must not pass by skipping.
pub fn default_model() -> PathBuf {
    let p = std::env::var_os("MODEL_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models").join(DEFAULT_MODEL_FILE));
    assert!(
        p.exists(),
        "model {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// Gemma 3 270M in `models/` of the workspace.
///
/// Panics with the fix when it is missing: tests must not pass by skipping.
pub fn gemma3_model() -> PathBuf {
    let p = workspace_root().join("models").join(GEMMA3_MODEL_FILE);
    assert!(
        p.exists(),
        "model {} is missing: run scripts/fetch-model.sh gemma3",
        p.display()
    );
    p
}
