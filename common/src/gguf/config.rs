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
    /// Qwen2 (and 2.5): llama with q/k/v biases and NEOX-style RoPE.
    Qwen2,
    /// Qwen3: NEOX-style RoPE, RMS norms on each head's query and key, no biases.
    Qwen3,
    /// Gemma 3: the embedding scaled by √d, norms before and after attention and the FFN,
    /// RMS norms on queries and keys, GELU gating, sliding-window attention on most layers.
    Gemma3,
}

impl Architecture {
    /// The GGUF name, which is also the metadata key prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma3 => "gemma3",
        }
    }

    /// Every architecture this runtime implements, by GGUF name.
    pub const ALL: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma3,
    ];
}

impl std::str::FromStr for Architecture {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| Error::UnsupportedArchitecture(s.to_string()))
    }
}

/// The gating function of the feed-forward network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU): llama, qwen.
    Silu,
    /// `gelu_tanh(gate) * up` (GeGLU): gemma.
    GeluTanh,
}

/// Which layers attend through a sliding window, and how wide it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    /// Keys a query sees, itself included: a token at position `p` attends to positions
    /// `p + 1 - window ..= p`.
    pub window: usize,
    /// Every `period`-th layer (the last of each period) attends to the whole context; the
    /// others are local. Gemma 3: 6.
    pub period: usize,
    /// RoPE base of the local layers (the global ones use [`ModelConfig::rope_base`]).
    pub rope_base: f32,
}

impl SlidingWindow {
    /// Whether layer `i` (of the whole model) is local.
    pub fn is_local(&self, i: usize) -> bool {
        !(i + 1).is_multiple_of(self.period)
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
    /// Linear RoPE scaling: positions are divided by this (1 when unscaled).
    pub rope_linear_scale: f32,
    /// How RoPE pairs dimensions.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// The context length the model was trained for.
    pub context_length: usize,
    /// Vocabulary size, when the metadata says it (otherwise taken from the embedding).
    pub vocab_size: Option<usize>,
    /// The feed-forward gate.
    pub activation: Activation,
    /// Factor applied to the embedding rows (gemma: √hidden).
    pub embed_scale: Option<f32>,
    /// The sliding window of local layers, for models that have them.
    pub sliding_window: Option<SlidingWindow>,
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

    /// The window layer `i` attends through, `None` for full attention.
    pub fn window_of(&self, i: usize) -> Option<usize> {
        self.sliding_window
            .filter(|w| w.is_local(i))
            .map(|w| w.window)
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
        let architecture: Architecture = arch_name.parse()?;
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
        if hidden % n_heads != 0 && meta.opt_u64(&key("attention.key_length"))?.is_none() {
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
        // The head width is the embedding split over the heads unless the file says otherwise
        // (gemma 3 and qwen3 have wider heads: 640 = 4 × 160, but heads of 256).
        let head_dim = match meta.opt_u64(&key("attention.key_length"))? {
            Some(k) => check_bound(&key("attention.key_length"), k, MAX_DIM)?,
            None => hidden / n_heads,
        };
        if let Some(v) = meta.opt_u64(&key("attention.value_length"))? {
            if v != head_dim as u64 {
                return Err(bad(
                    "attention.value_length",
                    format!("values of {v} and keys of {head_dim} differ; not supported"),
                ));
            }
        }
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
        let rope_linear_scale = match meta.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => 1.0,
            Some("linear") => {
                let f = meta.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0) as f32;
                if !(f.is_finite() && f >= 1.0) {
                    return Err(bad(
                        "rope.scaling.factor",
                        format!("{f} is not a linear scaling factor (at least 1)"),
                    ));
                }
                f
            }
            Some(other) => {
                return Err(bad(
                    "rope.scaling.type",
                    format!("RoPE scaling `{other}` is not supported (none and linear are)"),
                ))
            }
        };
        let sliding_window = match architecture {
            Architecture::Gemma3 => {
                let window = match meta.opt_u64(&key("attention.sliding_window"))? {
                    Some(w) => check_bound(&key("attention.sliding_window"), w, MAX_CONTEXT)?,
                    None => return Err(Error::MissingKey(key("attention.sliding_window"))),
                };
                // llama.cpp's gemma 3: five local layers, then a global one; the local RoPE
                // base 10 000 unless the file says, unscaled.
                let rope_base = meta
                    .opt_f64(&key("rope.freq_base_swa"))?
                    .map_or(10_000.0, |b| b as f32);
                if !(rope_base.is_finite() && rope_base > 1.0) {
                    return Err(bad(
                        "rope.freq_base_swa",
                        format!("{rope_base} is not a usable base"),
                    ));
                }
                Some(SlidingWindow {
                    window,
                    period: 6,
                    rope_base,
                })
            }
            _ => None,
        };

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
            rope_linear_scale,
            rope_style: match architecture {
                Architecture::Llama => RopeStyle::Interleaved,
                Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Gemma3 => {
                    RopeStyle::Halves
                }
            },
            rms_eps,
            context_length,
            vocab_size,
            activation: match architecture {
                Architecture::Gemma3 => Activation::GeluTanh,
                _ => Activation::Silu,
            },
            embed_scale: match architecture {
                Architecture::Gemma3 => Some((hidden as f32).sqrt()),
                _ => None,
            },
            sliding_window,
        })
    }
}
