//! The default model's folder, and single-process generation: the reference output of the
//! cluster tests.

use std::path::PathBuf;

use common::testing::default_model;

use crate::process::shard_node_bin;

/// The folder of the default model (the nodes' `--models-dir`).
pub fn models_dir() -> PathBuf {
    let model = default_model();
    model.parent().map(PathBuf::from).unwrap_or_default()
}

/// Greedy output of single-process `shard-node generate`.
pub fn generate(model: &std::path::Path, prompt: &str, n: u32) -> anyhow::Result<String> {
    let out = std::process::Command::new(shard_node_bin())
        .args([
            "generate",
            "--threads",
            "1",
            "--max-tokens",
            &n.to_string(),
            "--prompt",
            prompt,
            "--model",
        ])
        .arg(model)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_string())
}
