//! Synthetic llama models: a valid GGUF with random weights of a chosen shape and quantization
//! and a real model's tokenizer metadata, written with `gguf-rs-lib`'s writer. Used where
//! weights cannot be downloaded (benchmarks at 8B scale on the GPU machine) and to test loaders.

use std::path::Path;

use gguf_rs_lib::builder::GGUFBuilder;
use gguf_rs_lib::format::metadata::MetadataValue;
use gguf_rs_lib::tensor::TensorType;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// The weight type of a synthetic model's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthQuant {
    /// 4-bit blocks of 32 with an f16 scale.
    Q4_0,
    /// 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// f16.
    F16,
}

impl std::str::FromStr for SynthQuant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q4_0" => Ok(SynthQuant::Q4_0),
            "q8_0" => Ok(SynthQuant::Q8_0),
            "f16" => Ok(SynthQuant::F16),
            _ => Err(format!("`{s}`: use q4_0, q8_0 or f16")),
        }
    }
}

/// The shape of a synthetic llama model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
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
        Ok(())
    }
}

/// xorshift64*: fast, seeded, good enough for random weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Random bytes of a `rows × cols` matrix (`cols` along a row) in `q`, scaled so that each
/// weight is about ±0.02, like a trained model's.
fn matrix(rng: &mut Rng, q: SynthQuant, rows: u64, cols: u64) -> (TensorType, Vec<u8>) {
    let n = (rows * cols) as usize;
    let scale = |rng: &mut Rng, max: f32| {
        let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
        half::f16::from_f32(max * (0.5 + 0.5 * u)).to_le_bytes()
    };
    match q {
        SynthQuant::Q4_0 => {
            let mut v = vec![0u8; n / 32 * 18];
            for b in v.chunks_mut(18) {
                b[..2].copy_from_slice(&scale(rng, 0.003));
                rng.fill(&mut b[2..]);
            }
            (TensorType::Q4_0, v)
        }
        SynthQuant::Q8_0 => {
            let mut v = vec![0u8; n / 32 * 34];
            for b in v.chunks_mut(34) {
                b[..2].copy_from_slice(&scale(rng, 0.0002));
                rng.fill(&mut b[2..]);
            }
            (TensorType::Q8_0, v)
        }
        SynthQuant::F16 => {
            let mut v = vec![0u8; n * 2];
            for w in v.chunks_mut(2) {
                let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
                w.copy_from_slice(&half::f16::from_f32((u - 0.5) * 0.04).to_le_bytes());
            }
            (TensorType::F16, v)
        }
    }
}

fn ones(n: u32) -> Vec<u8> {
    (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect()
}

/// Writes a synthetic llama GGUF to `out` with `tokenizer`'s tokenizer metadata (and vocabulary
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
    let (h, f) = (u64::from(spec.hidden), u64::from(spec.ffn));
    let kv = h / u64::from(spec.heads) * u64::from(spec.kv_heads);
    let mut b = GGUFBuilder::new()
        .add_metadata(
            "general.architecture",
            MetadataValue::String("llama".into()),
        )
        .add_metadata(
            "general.name",
            MetadataValue::String(format!("synthetic-{}x{}", spec.layers, spec.hidden)),
        )
        .add_metadata("general.alignment", MetadataValue::U32(32))
        .add_metadata("llama.block_count", MetadataValue::U32(spec.layers))
        .add_metadata("llama.context_length", MetadataValue::U32(spec.context))
        .add_metadata("llama.embedding_length", MetadataValue::U32(spec.hidden))
        .add_metadata("llama.feed_forward_length", MetadataValue::U32(spec.ffn))
        .add_metadata("llama.attention.head_count", MetadataValue::U32(spec.heads))
        .add_metadata(
            "llama.attention.head_count_kv",
            MetadataValue::U32(spec.kv_heads),
        )
        .add_metadata(
            "llama.rope.dimension_count",
            MetadataValue::U32(spec.hidden / spec.heads),
        )
        .add_metadata("llama.rope.freq_base", MetadataValue::F32(10_000.0))
        .add_metadata(
            "llama.attention.layer_norm_rms_epsilon",
            MetadataValue::F32(1e-5),
        )
        .add_metadata("llama.vocab_size", MetadataValue::U32(vocab as u32));
    for (k, v) in tokenizer.metadata().iter() {
        if k.starts_with("tokenizer.") {
            b = b.add_metadata(k.clone(), v.clone());
        }
    }
    let mut rng = Rng(spec.seed.max(1));
    let mut total = 0u64;
    let mut add = |b: GGUFBuilder, name: String, shape: Vec<u64>, t: TensorType, d: Vec<u8>| {
        total += d.len() as u64;
        b.add_tensor(name, shape, t, d).map_err(gerr)
    };
    let (t, d) = matrix(&mut rng, spec.quant, vocab, h);
    b = add(b, "token_embd.weight".into(), vec![h, vocab], t, d)?;
    for i in 0..spec.layers {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        b = add(
            b,
            p("attn_norm"),
            vec![h],
            TensorType::F32,
            ones(spec.hidden),
        )?;
        b = add(
            b,
            p("ffn_norm"),
            vec![h],
            TensorType::F32,
            ones(spec.hidden),
        )?;
        for (name, rows, cols) in [
            ("attn_q", h, h),
            ("attn_k", kv, h),
            ("attn_v", kv, h),
            ("attn_output", h, h),
            ("ffn_gate", f, h),
            ("ffn_up", f, h),
            ("ffn_down", h, f),
        ] {
            let (t, d) = matrix(&mut rng, spec.quant, rows, cols);
            b = add(b, p(name), vec![cols, rows], t, d)?;
        }
    }
    b = add(
        b,
        "output_norm.weight".into(),
        vec![h],
        TensorType::F32,
        ones(spec.hidden),
    )?;
    let (t, d) = matrix(&mut rng, spec.quant, vocab, h);
    b = add(b, "output.weight".into(), vec![h, vocab], t, d)?;
    b.build_to_file(out).map_err(gerr)?;
    Ok(total)
}
