//! Hostile GGUF bytes, built in memory: every one is a clear, typed error, never a panic.

use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::Device;
use common::gguf::GgufFile;
use common::model::{LayerRange, Stage};
use common::Error;
use rand::{Rng, SeedableRng};

/// A minimal GGUF writer for tests: metadata and f32 tensors.
#[derive(Default, Clone)]
struct Gguf {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    tensor_count_override: Option<u64>,
}

fn s(x: &str) -> Vec<u8> {
    let mut v = (x.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(x.as_bytes());
    v
}

impl Gguf {
    fn u32(mut self, k: &str, v: u32) -> Self {
        self.kv.push((k.into(), 4, v.to_le_bytes().to_vec()));
        self
    }
    fn f32(mut self, k: &str, v: f32) -> Self {
        self.kv.push((k.into(), 6, v.to_le_bytes().to_vec()));
        self
    }
    fn str(mut self, k: &str, v: &str) -> Self {
        self.kv.push((k.into(), 8, s(v)));
        self
    }
    fn remove(mut self, k: &str) -> Self {
        self.kv.retain(|(key, _, _)| key != k);
        self
    }
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }
    fn f32_tensor(self, name: &str, dims: &[u64]) -> Self {
        let n: u64 = dims.iter().product();
        let data = (0..n)
            .flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes())
            .collect();
        self.tensor(name, dims, 0, data)
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(
            &self
                .tensor_count_override
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        b.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            b.extend(s(k));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            b.extend(s(name));
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        for (_, _, _, data) in &self.tensors {
            b.extend_from_slice(data);
            while !b.len().is_multiple_of(32) {
                b.push(0);
            }
        }
        b
    }
}

/// A tiny valid llama: 1 block, hidden 64, 2 heads, 1 kv head, ffn 64, vocab 32.
fn tiny() -> Gguf {
    let mut g = Gguf::default()
        .str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 128)
        .u32("llama.embedding_length", 64)
        .u32("llama.feed_forward_length", 64)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 1)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .f32_tensor("token_embd.weight", &[64, 32])
        .f32_tensor("output_norm.weight", &[64]);
    for (n, d) in [
        ("attn_norm.weight", vec![64]),
        ("ffn_norm.weight", vec![64]),
        ("attn_q.weight", vec![64, 64]),
        ("attn_k.weight", vec![64, 32]),
        ("attn_v.weight", vec![64, 32]),
        ("attn_output.weight", vec![64, 64]),
        ("ffn_gate.weight", vec![64, 64]),
        ("ffn_up.weight", vec![64, 64]),
        ("ffn_down.weight", vec![64, 64]),
    ] {
        g = g.f32_tensor(&format!("blk.0.{n}"), &d);
    }
    g
}

/// Opens the bytes and builds a full stage; returns the error if any step fails.
fn load(bytes: &[u8]) -> Result<Stage, Error> {
    let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, bytes).map_err(|e| Error::Config(e.to_string()))?;
    let f = GgufFile::open(&path)?;
    let cfg = f.config()?;
    Stage::load(&f, LayerRange::full(cfg.n_layers)?, &Device::Cpu, 64)
}

#[test]
fn the_tiny_model_loads_and_runs() -> anyhow::Result<()> {
    let stage = load(&tiny().bytes())?;
    let mut cache = stage.new_cache(64, Default::default())?;
    let x = stage.embed(&[1, 2, 3])?;
    let y = stage.forward(&x, &mut cache, 0)?;
    assert_eq!(stage.head(&y)?.dims(), [3, 32]);
    assert!(
        matches!(stage.embed(&[32]), Err(Error::InvalidInput(_))),
        "token id past the vocabulary"
    );
    assert!(matches!(
        stage.forward(&x, &mut cache, 0),
        Err(Error::PositionMismatch { .. })
    ));
    let long = stage.embed(&vec![1; 62])?;
    assert!(matches!(
        stage.forward(&long, &mut cache, 3),
        Err(Error::ContextOverflow {
            needed: 65,
            max: 64
        })
    ));
    Ok(())
}

#[test]
fn each_defect_is_a_clear_error() {
    let check = |bytes: Vec<u8>, what: &str, ok: &dyn Fn(&Error) -> bool| {
        let e = load(&bytes)
            .err()
            .unwrap_or_else(|| panic!("{what}: loaded"));
        assert!(ok(&e), "{what}: unexpected error {e}");
        assert!(!e.to_string().is_empty());
    };
    let mut bad_magic = tiny().bytes();
    bad_magic[..4].copy_from_slice(b"GGUX");
    check(
        bad_magic,
        "bad magic",
        &|e| matches!(e, Error::Gguf { source, .. } if source.to_string().to_lowercase().contains("magic")),
    );
    let full = tiny().bytes();
    check(full[..20].to_vec(), "truncated header", &|e| {
        matches!(e, Error::Gguf { .. } | Error::BadGguf(_))
    });
    check(full[..300].to_vec(), "truncated metadata", &|e| {
        matches!(e, Error::Gguf { .. } | Error::BadGguf(_))
    });
    check(full[..full.len() - 100].to_vec(), "truncated data", &|e| {
        matches!(e, Error::Gguf { .. } | Error::BadGguf(_))
    });
    let absurd = Gguf {
        tensor_count_override: Some(u64::MAX),
        ..tiny()
    };
    check(absurd.bytes(), "absurd tensor count", &|e| {
        matches!(e, Error::Gguf { .. } | Error::BadGguf(_))
    });
    let mut huge_string = tiny().bytes();
    // the first key's length field sits right after the 24-byte header
    huge_string[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    check(huge_string, "absurd string length", &|e| {
        matches!(e, Error::Gguf { .. } | Error::BadGguf(_))
    });
    check(
        tiny()
            .remove("general.architecture")
            .str("general.architecture", "gptj")
            .bytes(),
        "unsupported architecture",
        &|e| matches!(e, Error::UnsupportedArchitecture(a) if a == "gptj"),
    );
    check(
        tiny().remove("llama.block_count").bytes(),
        "missing key",
        &|e| matches!(e, Error::MissingKey(k) if k == "llama.block_count"),
    );
    check(
        tiny()
            .remove("llama.embedding_length")
            .u32("llama.embedding_length", u32::MAX)
            .bytes(),
        "absurd size",
        &|e| matches!(e, Error::BadKey { key, .. } if key == "llama.embedding_length"),
    );
    check(
        tiny()
            .remove("llama.attention.head_count_kv")
            .u32("llama.attention.head_count_kv", 3)
            .bytes(),
        "kv heads that do not divide heads",
        &|e| matches!(e, Error::BadKey { .. }),
    );
    let mut unsupported = tiny();
    unsupported
        .tensors
        .retain(|t| t.0 != "blk.0.ffn_down.weight");
    // IQ2_XXS (type 16): 66 bytes per 256 values
    let unsupported =
        unsupported.tensor("blk.0.ffn_down.weight", &[256, 16], 16, vec![0u8; 66 * 16]);
    check(unsupported.bytes(), "unsupported quant type", &|e| {
        matches!(e, Error::UnsupportedQuant { tensor, .. } if tensor == "blk.0.ffn_down.weight")
            || matches!(e, Error::BadTensor { tensor, .. } if tensor == "blk.0.ffn_down.weight")
    });
    let mut wrong_shape = tiny();
    wrong_shape.tensors.retain(|t| t.0 != "blk.0.attn_q.weight");
    let wrong_shape = wrong_shape.f32_tensor("blk.0.attn_q.weight", &[64, 32]);
    check(
        wrong_shape.bytes(),
        "wrong tensor shape",
        &|e| matches!(e, Error::BadTensor { tensor, .. } if tensor.contains("attn_q")),
    );
    let mut missing = tiny();
    missing.tensors.retain(|t| t.0 != "blk.0.ffn_up.weight");
    check(
        missing.bytes(),
        "missing tensor",
        &|e| matches!(e, Error::BadTensor { tensor, .. } if tensor == "blk.0.ffn_up.weight"),
    );
}

#[test]
fn random_corruption_never_panics() {
    let good = tiny().bytes();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut errors = 0;
    for i in 0..400 {
        let mut b = good.clone();
        match i % 3 {
            0 => b.truncate(rng.gen_range(0..good.len())),
            1 => {
                for _ in 0..rng.gen_range(1..8) {
                    let at = rng.gen_range(0..b.len().min(900));
                    b[at] = rng.gen();
                }
            }
            _ => {
                let at = rng.gen_range(0..b.len().min(900) - 8);
                b[at..at + 8].copy_from_slice(&rng.gen::<u64>().to_le_bytes());
            }
        }
        let r = catch_unwind(AssertUnwindSafe(|| load(&b).map(|_| ())));
        match r {
            Ok(Err(_)) => errors += 1,
            Ok(Ok(())) => {}
            Err(_) => panic!("corruption {i} panicked"),
        }
    }
    assert!(errors > 300, "most corruptions must be detected ({errors})");
}
