//! `shard-node synth-model` writes valid llama GGUFs: for a fixed seed the file is
//! byte-for-byte the one llama.cpp was run on (its sha256 is recorded), and our runtime's
//! greedy ids on it equal llama.cpp's (tests/fixtures/synth_llama_cpp.json), for Q4_0, Q8_0
//! and F16 weights.

use std::process::Command;

use common::device::init_threads;
use common::generate::LocalPipeline;
use common::gguf::GgufFile;
use common::model::LayerRange;
use common::sampling::argmax;
use common::tokenizer::TextTokenizer;
use integration_tests::{default_model, shard_node_bin, workspace_root};

fn sha256(p: &std::path::Path) -> anyhow::Result<String> {
    Ok(common::gguf::sha256(p)?)
}

#[test]
fn synthetic_models_load_and_match_llama_cpp() -> anyhow::Result<()> {
    init_threads(Some(1))?;
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        workspace_root().join("tests/fixtures/synth_llama_cpp.json"),
    )?)?;
    let shape = &fixture["shape"];
    let prompt = fixture["prompt"].as_str().unwrap_or_default();
    let dir = tempfile::tempdir()?;
    let cases = fixture["cases"]
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("no cases"))?;
    assert_eq!(cases.len(), 3);
    for (quant, case) in cases {
        let out = dir.path().join(format!("{quant}.gguf"));
        let arg = |k: &str| shape[k].to_string();
        let status = Command::new(shard_node_bin())
            .args(["synth-model", "--quant", quant, "--layers", &arg("layers")])
            .args([
                "--hidden",
                &arg("hidden"),
                "--ffn",
                &arg("ffn"),
                "--heads",
                &arg("heads"),
            ])
            .args(["--kv-heads", &arg("kv_heads"), "--seed", &arg("seed")])
            .arg("--tokenizer-from")
            .arg(default_model())
            .arg("--out")
            .arg(&out)
            .status()?;
        assert!(status.success(), "{quant}: synth-model failed");
        assert_eq!(
            sha256(&out)?,
            case["sha256"].as_str().unwrap_or_default(),
            "{quant}: file"
        );
        let file = GgufFile::open(&out)?;
        let cfg = file.config()?;
        assert_eq!(cfg.n_layers, 2);
        let tok = TextTokenizer::from_gguf(&file)?;
        let ids = tok.encode(prompt)?;
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        let pipe = LocalPipeline::load(
            &file,
            &LayerRange::from_cuts(&[], cfg.n_layers)?,
            &candle_core::Device::Cpu,
            64,
        )?;
        let mut s = pipe.session(64)?;
        let mut logits = pipe.prefill(&mut s, &ids)?;
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let next = argmax(&logits);
            got.push(next);
            logits = pipe.decode(&mut s, next)?;
        }
        assert_eq!(got, want, "{quant}: greedy ids against llama.cpp");
    }
    Ok(())
}
