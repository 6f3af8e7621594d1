//! A stage reads and holds only its own tensors.

use std::collections::BTreeSet;

use candle_core::Device;
use common::gguf::GgufFile;
use common::model::{LayerRange, Stage};
use integration_tests::default_model;

#[test]
fn middle_stage_holds_exactly_its_blocks() -> anyhow::Result<()> {
    let file = GgufFile::open(default_model())?;
    let stage = Stage::load(&file, LayerRange::new(10, 20)?, &Device::Cpu, 256)?;
    let names: BTreeSet<&str> = stage.tensor_names().iter().map(String::as_str).collect();
    let want: BTreeSet<&str> = file
        .tensors()
        .map(|t| t.name.as_str())
        .filter(|n| {
            n.strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<u32>().ok())
                .is_some_and(|i| (10..20).contains(&i))
        })
        .collect();
    assert_eq!(names, want, "tensors of blocks 10..20 and nothing else");
    assert!(!names.contains("token_embd.weight") && !names.contains("output_norm.weight"));
    let sum: u64 = names
        .iter()
        .map(|n| file.require(n).map(|d| d.nbytes))
        .sum::<Result<u64, _>>()?;
    assert_eq!(
        stage.weight_bytes() as u64,
        sum,
        "attributed bytes equal the tensors' sizes"
    );
    assert!(!stage.is_first() && !stage.is_last());
    assert!(stage.embed(&[1]).is_err(), "a middle stage cannot embed");
    Ok(())
}

#[test]
fn first_and_last_stages_add_embedding_and_head() -> anyhow::Result<()> {
    let file = GgufFile::open(default_model())?;
    let first = Stage::load(&file, LayerRange::new(0, 1)?, &Device::Cpu, 256)?;
    assert!(first
        .tensor_names()
        .iter()
        .any(|n| n == "token_embd.weight"));
    assert!(first.is_first() && !first.is_last());
    let last = Stage::load(&file, LayerRange::new(29, 30)?, &Device::Cpu, 256)?;
    // SmolLM2 has no output.weight: the head is the tied token_embd.
    assert!(file.tensor("output.weight").is_none());
    let names: BTreeSet<&str> = last.tensor_names().iter().map(String::as_str).collect();
    assert!(names.contains("token_embd.weight") && names.contains("output_norm.weight"));
    assert!(last.is_last() && !last.is_first());
    let sum: u64 = names
        .iter()
        .map(|n| file.require(n).map(|d| d.nbytes))
        .sum::<Result<u64, _>>()?;
    assert_eq!(last.weight_bytes() as u64, sum);
    Ok(())
}
