//! Synthetic models of every supported architecture: a valid GGUF with random weights of a
//! chosen shape and quantization and a real model's tokenizer metadata, written with
//! `gguf-rs-lib`'s writer. Used where weights cannot be downloaded (benchmarks at 8B scale on
//! the GPU machine), to test loaders, and to check each architecture against llama.cpp on
//! small random models (`scripts/llama_reference.py`). The random blocks are in
//! [`super::synth_blocks`].

use std::path::Path;

use gguf_rs_lib::builder::GGUFBuilder;
use gguf_rs_lib::format::metadata::MetadataValue;
use gguf_rs_lib::tensor::TensorType;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

pub use super::synth_blocks::SynthQuant;
use super::synth_blocks::{matrix, Rng};
use super::Architecture;

/// The shape of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// The family: which tensors and metadata the file has.
    pub arch: Architecture,
    /// Transformer blocks.
    pub layers: u32,
    /// Embedding width.
    pub hidden: u32,
    /// Feed-forward width.
    pub ffn: u32,
    /// Attention heads.
    pub heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// Context length recorded in the metadata.
    pub context: u32,
    /// Matrix weight type.
    pub quant: SynthQuant,
    /// Random seed.
    pub seed: u64,
    /// Gemma 3's sliding window (keys a local layer sees).
    pub window: u32,
    /// Llama 3.1's per-frequency RoPE factors (`rope_freqs.weight`), llama only.
    pub rope_freqs: bool,
    /// A chat template in place of the tokenizer file's.
    pub chat_template: Option<String>,
}

impl SynthSpec {
    /// A llama of this shape with defaults for the rest.
    pub fn llama(layers: u32, hidden: u32, ffn: u32, heads: u32, kv_heads: u32) -> Self {
        SynthSpec {
            arch: Architecture::Llama,
            layers,
            hidden,
            ffn,
            heads,
            kv_heads,
            context: 4096,
            quant: SynthQuant::Q4_0,
            seed: 1,
            window: 512,
            rope_freqs: false,
            chat_template: None,
        }
    }

    /// The head width: gemma 3 and qwen3 write theirs (wider than `hidden / heads` here, as
    /// in the real models); the others split the embedding.
    pub fn head_dim(&self) -> u32 {
        match self.arch {
            Architecture::Gemma3 | Architecture::Qwen3 => 2 * self.hidden / self.heads,
            _ => self.hidden / self.heads,
        }
    }
}

impl SynthSpec {
    /// Checks the shape: every width a multiple of 32 (quant blocks), heads dividing the
    /// width, kv heads dividing the heads.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.layers == 0 || self.layers > 512 {
            return bad(format!("layers {} is not in 1..=512", self.layers));
        }
        if self.hidden == 0
            || !self.hidden.is_multiple_of(32)
            || self.ffn == 0
            || !self.ffn.is_multiple_of(32)
        {
            return bad("hidden and ffn must be positive multiples of 32".into());
        }
        if self.heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || !(self.hidden / self.heads).is_multiple_of(2)
        {
            return bad("heads must divide hidden into an even head size".into());
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad("kv-heads must divide heads".into());
        }
        if !(self.hidden / self.heads * self.kv_heads).is_multiple_of(32) {
            return bad("the key/value width must be a multiple of 32".into());
        }
        let k_widths = [self.hidden, self.ffn, self.head_dim() * self.heads];
        if self.quant.has_k_blocks() && k_widths.iter().any(|w| !w.is_multiple_of(256)) {
            return bad(format!(
                "{:?} needs hidden, ffn and the query width to be multiples of 256",
                self.quant
            ));
        }
        if self.rope_freqs && self.arch != Architecture::Llama {
            return bad("rope frequency factors are llama 3.1's; use --arch llama".into());
        }
        if self.window == 0 {
            return bad("the sliding window must be at least 1".into());
        }
        Ok(())
    }
}

/// Norm weights about 1 (gemma's files hold `1 + w`), random so that a norm that is
/// skipped or misplaced changes the output.
fn norm(rng: &mut Rng, n: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|_| {
            let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
            (0.8 + 0.4 * u).to_le_bytes()
        })
        .collect()
}

/// Small random biases (qwen2).
fn bias(rng: &mut Rng, n: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|_| {
            let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
            ((u - 0.5) * 0.2).to_le_bytes()
        })
        .collect()
}

/// Llama 3.1's frequency divisors (factor 8, low 1, high 4, original context 8192) for heads
/// of `head_dim` with base `base`.
fn llama3_freq_factors(head_dim: u32, base: f32) -> Vec<u8> {
    let (factor, low, high, original) = (8.0f64, 1.0f64, 4.0f64, 8192.0f64);
    (0..head_dim / 2)
        .flat_map(|i| {
            let freq = f64::from(base).powf(-2.0 * f64::from(i) / f64::from(head_dim));
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < original / high {
                1.0
            } else if wavelen > original / low {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            (f as f32).to_le_bytes()
        })
        .collect()
}

/// Writes a synthetic GGUF to `out` with `tokenizer`'s tokenizer metadata (and vocabulary
/// size); returns the bytes of its tensors.
pub fn write(spec: &SynthSpec, tokenizer: &GgufFile, out: &Path) -> Result<u64> {
    spec.validate()?;
    let vocab = tokenizer
        .metadata()
        .iter()
        .find_map(|(k, v)| match (k.as_str(), v) {
            ("tokenizer.ggml.tokens", MetadataValue::Array(a)) => Some(a.length),
            _ => None,
        })
        .ok_or_else(|| Error::MissingKey("tokenizer.ggml.tokens".into()))?;
    let gerr = |source| Error::Gguf {
        path: out.to_path_buf(),
        source,
    };
    let arch = spec.arch;
    let p = arch.as_str();
    let k = |s: &str| format!("{p}.{s}");
    let hd = spec.head_dim();
    let (h, f) = (u64::from(spec.hidden), u64::from(spec.ffn));
    let (qw, kv) = (u64::from(hd * spec.heads), u64::from(hd * spec.kv_heads));
    let base = match arch {
        Architecture::Gemma3 => 1_000_000.0,
        _ => 10_000.0,
    };
    let mut b = GGUFBuilder::new()
        .add_metadata("general.architecture", MetadataValue::String(p.into()))
        .add_metadata(
            "general.name",
            MetadataValue::String(format!("synthetic-{p}-{}x{}", spec.layers, spec.hidden)),
        )
        .add_metadata("general.alignment", MetadataValue::U32(32))
        .add_metadata(k("block_count"), MetadataValue::U32(spec.layers))
        .add_metadata(k("context_length"), MetadataValue::U32(spec.context))
        .add_metadata(k("embedding_length"), MetadataValue::U32(spec.hidden))
        .add_metadata(k("feed_forward_length"), MetadataValue::U32(spec.ffn))
        .add_metadata(k("attention.head_count"), MetadataValue::U32(spec.heads))
        .add_metadata(
            k("attention.head_count_kv"),
            MetadataValue::U32(spec.kv_heads),
        )
        .add_metadata(k("rope.dimension_count"), MetadataValue::U32(hd))
        .add_metadata(k("rope.freq_base"), MetadataValue::F32(base))
        .add_metadata(
            k("attention.layer_norm_rms_epsilon"),
            MetadataValue::F32(if arch == Architecture::Gemma3 {
                1e-6
            } else {
                1e-5
            }),
        )
        .add_metadata(k("vocab_size"), MetadataValue::U32(vocab as u32));
    if matches!(arch, Architecture::Gemma3 | Architecture::Qwen3) {
        b = b
            .add_metadata(k("attention.key_length"), MetadataValue::U32(hd))
            .add_metadata(k("attention.value_length"), MetadataValue::U32(hd));
    }
    if arch == Architecture::Gemma3 {
        b = b.add_metadata(
            k("attention.sliding_window"),
            MetadataValue::U32(spec.window),
        );
    }
    for (key, v) in tokenizer.metadata().iter() {
        let replaced = key == "tokenizer.chat_template" && spec.chat_template.is_some();
        if key.starts_with("tokenizer.") && !replaced {
            b = b.add_metadata(key.clone(), v.clone());
        }
    }
    if let Some(t) = &spec.chat_template {
        b = b.add_metadata(
            "tokenizer.chat_template".to_string(),
            MetadataValue::String(t.clone()),
        );
    }
    let mut rng = Rng::new(spec.seed);
    let mut total = 0u64;
    let mut add = |b: GGUFBuilder, name: String, shape: Vec<u64>, t: TensorType, d: Vec<u8>| {
        total += d.len() as u64;
        b.add_tensor(name, shape, t, d).map_err(gerr)
    };
    let q = spec.quant;
    let (t, d) = matrix(&mut rng, q.embedding(), vocab, h);
    b = add(b, "token_embd.weight".into(), vec![h, vocab], t, d)?;
    if spec.rope_freqs {
        b = add(
            b,
            "rope_freqs.weight".into(),
            vec![u64::from(hd / 2)],
            TensorType::F32,
            llama3_freq_factors(hd, base),
        )?;
    }
    for i in 0..spec.layers {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        let mut norms = vec!["attn_norm", "ffn_norm"];
        if arch == Architecture::Gemma3 {
            norms.extend(["post_attention_norm", "post_ffw_norm"]);
        }
        for n in norms {
            let d = norm(&mut rng, h);
            b = add(b, p(n), vec![h], TensorType::F32, d)?;
        }
        if matches!(arch, Architecture::Gemma3 | Architecture::Qwen3) {
            for n in ["attn_q_norm", "attn_k_norm"] {
                let d = norm(&mut rng, u64::from(hd));
                b = add(b, p(n), vec![u64::from(hd)], TensorType::F32, d)?;
            }
        }
        for (name, rows, cols) in [
            ("attn_q", qw, h),
            ("attn_k", kv, h),
            ("attn_v", kv, h),
            ("attn_output", h, qw),
            ("ffn_gate", f, h),
            ("ffn_up", f, h),
            ("ffn_down", h, f),
        ] {
            let (t, d) = matrix(&mut rng, q.matrix(name), rows, cols);
            b = add(b, p(name), vec![cols, rows], t, d)?;
        }
        if arch == Architecture::Qwen2 {
            for (name, rows) in [("attn_q", qw), ("attn_k", kv), ("attn_v", kv)] {
                let d = bias(&mut rng, rows);
                b = add(
                    b,
                    format!("blk.{i}.{name}.bias"),
                    vec![rows],
                    TensorType::F32,
                    d,
                )?;
            }
        }
    }
    let d = norm(&mut rng, h);
    b = add(b, "output_norm.weight".into(), vec![h], TensorType::F32, d)?;
    // Gemma ties its head to the embedding, as the real files do.
    if arch != Architecture::Gemma3 {
        let (t, d) = matrix(&mut rng, q.output(), vocab, h);
        b = add(b, "output.weight".into(), vec![h, vocab], t, d)?;
    }
    b.build_to_file(out).map_err(gerr)?;
    Ok(total)
}
