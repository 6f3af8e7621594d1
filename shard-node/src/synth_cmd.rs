//! `shard-node synth-model`: writes a synthetic llama GGUF (random weights, a real model's
//! tokenizer) for benchmarks where weights cannot be downloaded.

use std::path::PathBuf;

use common::gguf::synth::{self, SynthQuant, SynthSpec};
use common::gguf::GgufFile;

/// Options of `synth-model`.
#[derive(Debug, Clone, clap::Args)]
pub struct SynthOptions {
    /// Transformer blocks.
    #[arg(long, default_value_t = 32)]
    pub layers: u32,
    /// Embedding width.
    #[arg(long, default_value_t = 4096)]
    pub hidden: u32,
    /// Feed-forward width.
    #[arg(long, default_value_t = 14336)]
    pub ffn: u32,
    /// Attention heads.
    #[arg(long, default_value_t = 32)]
    pub heads: u32,
    /// Key/value heads.
    #[arg(long, default_value_t = 8)]
    pub kv_heads: u32,
    /// Context length recorded in the file.
    #[arg(long, default_value_t = 4096)]
    pub context: u32,
    /// Weight type of the matrices: q4_0, q8_0 or f16.
    #[arg(long, default_value = "q4_0")]
    pub quant: SynthQuant,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The GGUF whose tokenizer metadata (and vocabulary size) the model takes.
    #[arg(long)]
    pub tokenizer_from: PathBuf,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes the model and prints its size.
pub fn run(o: SynthOptions) -> anyhow::Result<()> {
    let tok = GgufFile::open(&o.tokenizer_from)?;
    let spec = SynthSpec {
        layers: o.layers,
        hidden: o.hidden,
        ffn: o.ffn,
        heads: o.heads,
        kv_heads: o.kv_heads,
        context: o.context,
        quant: o.quant,
        seed: o.seed,
    };
    let bytes = synth::write(&spec, &tok, &o.out)?;
    println!("wrote {} ({bytes} bytes of tensors)", o.out.display());
    Ok(())
}
