//! `shard-node synth-model`: writes a synthetic GGUF of any supported architecture (random
//! weights, a real model's tokenizer) for benchmarks where weights cannot be downloaded and
//! for checks against llama.cpp.

use std::path::PathBuf;

use common::gguf::synth::{self, SynthQuant, SynthSpec};
use common::gguf::{Architecture, GgufFile};

/// Options of `synth-model`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  shard-node synth-model --tokenizer-from models/SmolLM2-135M-Instruct.Q4_1.gguf --out 8b.gguf
  shard-node synth-model --arch gemma3 --layers 6 --hidden 256 --ffn 512 --heads 4 \\
      --kv-heads 1 --sliding-window 16 --quant q4_k_m \\
      --tokenizer-from models/gemma-3-270m-q4_k_m.gguf --out gemma3-small.gguf")]
pub struct SynthOptions {
    /// Architecture: llama, qwen2, qwen3 or gemma3.
    #[arg(long, default_value = "llama", value_parser = parse_arch)]
    pub arch: Architecture,
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
    /// Weight type of the matrices: q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, q4_k_m,
    /// q5_k_m or f16 (K types need widths that are multiples of 256).
    #[arg(long, default_value = "q4_0")]
    pub quant: SynthQuant,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Gemma 3's sliding window: keys a local layer sees.
    #[arg(long, default_value_t = 512)]
    pub sliding_window: u32,
    /// Write llama 3.1's RoPE frequency factors (`rope_freqs.weight`); llama only.
    #[arg(long)]
    pub rope_freqs: bool,
    /// The GGUF whose tokenizer metadata (and vocabulary size) the model takes.
    #[arg(long)]
    pub tokenizer_from: PathBuf,
    /// A file whose text becomes the model's chat template (instead of the tokenizer
    /// file's), e.g. one that shows the model tools.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes the model and prints its size.
pub fn run(o: SynthOptions) -> anyhow::Result<()> {
    let tok = GgufFile::open(&o.tokenizer_from)?;
    let chat_template = match &o.chat_template {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading the chat template {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let spec = SynthSpec {
        arch: o.arch,
        window: o.sliding_window,
        rope_freqs: o.rope_freqs,
        chat_template,
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

fn parse_arch(s: &str) -> Result<Architecture, String> {
    s.parse().map_err(|_| {
        let all: Vec<&str> = Architecture::ALL.iter().map(|a| a.as_str()).collect();
        format!("`{s}`: use one of {}", all.join(", "))
    })
}
