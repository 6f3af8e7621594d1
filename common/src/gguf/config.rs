//! The typed model configuration, parsed from GGUF metadata with a check for required keys.

use gguf_rs_lib::format::metadata::Metadata;

use super::meta::Meta;
use crate::error::{Error, Result};

/// Largest value accepted for any size in the configuration; anything bigger is a hostile or
/// broken file, not a model.
const MAX_DIM: u64 = 1 << 20;
const MAX_LAYERS: u64 = 4096;
const MAX_VOCAB: u64 = 1 << 24;
const MAX_CONTEXT: u64 = 1 << 24;

/// The model families this runtime implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama and its many derivatives (SmolLM2, Mistral-7B...).
    Llama,
    /// Qwen2: llama with q/k/v biases and NEOX-style RoPE.
    Qwen2,
}

impl Architecture {
    /// The GGUF name, which is also the metadata key prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama in GGUF, whose Q/K rows were permuted at conversion.
    Interleaved,
    /// Halves (i, i + d/2): NEOX style, used by qwen2.
    Halves,
}

/// What a stage needs to know about the model, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The model family.
    pub architecture: Architecture,
    /// `general.name`, if present.
    pub name: Option<String>,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Inner width of the feed-forward network.
    pub ffn: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// How RoPE pairs dimensions.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// The context length the model was trained for.
    pub context_length: usize,
    /// Vocabulary size, when the metadata says it (otherwise taken from the embedding).
    pub vocab_size: Option<usize>,
}

impl ModelConfig {
    /// Query width (`n_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Key/value width (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

fn bounded(meta: &Meta<'_>, key: &str, max: u64) -> Result<usize> {
    let v = meta.u64(key)?;
    check_bound(key, v, max)
}

fn check_bound(key: &str, v: u64, max: u64) -> Result<usize> {
    if v == 0 || v > max {
        return Err(Error::BadKey {
            key: key.to_string(),
            reason: format!("{v} is outside 1..={max}"),
        });
    }
    usize::try_from(v).map_err(|_| Error::BadKey {
        key: key.to_string(),
        reason: format!("{v} does not fit this platform"),
    })
}

impl TryFrom<&Metadata> for ModelConfig {
    type Error = Error;

    fn try_from(md: &Metadata) -> Result<Self> {
        let meta = Meta(md);
        let arch_name = meta.str("general.architecture")?;
        let architecture = match arch_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => return Err(Error::UnsupportedArchitecture(other.to_string())),
        };
        let p = architecture.as_str();
        let key = |k: &str| format!("{p}.{k}");

        let n_layers = bounded(&meta, &key("block_count"), MAX_LAYERS)?;
        let hidden = bounded(&meta, &key("embedding_length"), MAX_DIM)?;
        let ffn = bounded(&meta, &key("feed_forward_length"), MAX_DIM)?;
        let n_heads = bounded(&meta, &key("attention.head_count"), MAX_DIM)?;
        let n_kv_heads = match meta.opt_u64(&key("attention.head_count_kv"))? {
            Some(v) => check_bound(&key("attention.head_count_kv"), v, MAX_DIM)?,
            None => n_heads,
        };
        let context_length = bounded(&meta, &key("context_length"), MAX_CONTEXT)?;
        let rms_eps = meta
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| Error::MissingKey(key("attention.layer_norm_rms_epsilon")))?;
        let rope_base = meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32;
        let vocab_size = match meta.opt_u64(&key("vocab_size"))? {
            Some(v) => Some(check_bound(&key("vocab_size"), v, MAX_VOCAB)?),
            None => None,
        };

        let bad = |k: &str, reason: String| Error::BadKey {
            key: key(k),
            reason,
        };
        if hidden % n_heads != 0 {
            return Err(bad(
                "attention.head_count",
                format!("{n_heads} heads do not divide the embedding length {hidden}"),
            ));
        }
        if n_heads % n_kv_heads != 0 {
            return Err(bad(
                "attention.head_count_kv",
                format!("{n_kv_heads} kv heads do not divide {n_heads} heads"),
            ));
        }
        let head_dim = hidden / n_heads;
        if let Some(rope_dims) = meta.opt_u64(&key("rope.dimension_count"))? {
            if rope_dims != head_dim as u64 {
                return Err(bad(
                    "rope.dimension_count",
                    format!("partial RoPE ({rope_dims} of {head_dim} dims) is not supported"),
                ));
            }
        }
        if head_dim % 2 != 0 {
            return Err(bad(
                "attention.head_count",
                format!("head width {head_dim} is odd"),
            ));
        }
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(bad(
                "attention.layer_norm_rms_epsilon",
                format!("{rms_eps} is not in (0, 1)"),
            ));
        }
        if !(rope_base.is_finite() && rope_base > 1.0) {
            return Err(bad(
                "rope.freq_base",
                format!("{rope_base} is not a usable base"),
            ));
        }
        if let Some(scaling) = meta.opt_str(&key("rope.scaling.type"))? {
            if scaling != "none" {
                return Err(bad(
                    "rope.scaling.type",
                    format!("RoPE scaling `{scaling}` is not supported"),
                ));
            }
        }

        Ok(ModelConfig {
            architecture,
            name: meta.opt_str("general.name")?.map(str::to_string),
            n_layers,
            hidden,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_base,
            rope_style: match architecture {
                Architecture::Llama => RopeStyle::Interleaved,
                Architecture::Qwen2 => RopeStyle::Halves,
            },
            rms_eps,
            context_length,
            vocab_size,
        })
    }
}
