//! Random weights of a synthetic model, block format by block format: random quants under
//! scales chosen so that each weight is about ±0.02, centred, like a trained model's.

use gguf_rs_lib::tensor::TensorType;

/// The weight types of a synthetic model's matrices: one type throughout, or one of
/// llama.cpp's mixes (`_M`: the value and FFN-down matrices one step finer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthQuant {
    /// 4-bit blocks of 32, scale only.
    Q4_0,
    /// 4-bit blocks of 32, scale and min.
    Q4_1,
    /// 5-bit blocks of 32, scale only.
    Q5_0,
    /// 5-bit blocks of 32, scale and min.
    Q5_1,
    /// 8-bit blocks of 32.
    Q8_0,
    /// 4-bit super-blocks of 256.
    Q4K,
    /// 5-bit super-blocks of 256.
    Q5K,
    /// 6-bit super-blocks of 256.
    Q6K,
    /// llama.cpp's Q4_K_M: Q4_K, with Q6_K for the value and FFN-down matrices and the head.
    Q4KM,
    /// llama.cpp's Q5_K_M: Q5_K, with Q6_K for the value and FFN-down matrices and the head.
    Q5KM,
    /// f16.
    F16,
}

const NAMES: [(&str, SynthQuant); 11] = [
    ("q4_0", SynthQuant::Q4_0),
    ("q4_1", SynthQuant::Q4_1),
    ("q5_0", SynthQuant::Q5_0),
    ("q5_1", SynthQuant::Q5_1),
    ("q8_0", SynthQuant::Q8_0),
    ("q4_k", SynthQuant::Q4K),
    ("q5_k", SynthQuant::Q5K),
    ("q6_k", SynthQuant::Q6K),
    ("q4_k_m", SynthQuant::Q4KM),
    ("q5_k_m", SynthQuant::Q5KM),
    ("f16", SynthQuant::F16),
];

impl std::str::FromStr for SynthQuant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        NAMES
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, q)| *q)
            .ok_or_else(|| {
                let all: Vec<&str> = NAMES.iter().map(|(n, _)| *n).collect();
                format!("`{s}`: use one of {}", all.join(", "))
            })
    }
}

impl std::fmt::Display for SynthQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = NAMES
            .iter()
            .find(|(_, q)| q == self)
            .map_or("?", |(n, _)| *n);
        f.write_str(name)
    }
}

impl SynthQuant {
    /// Whether some matrix is in 256-wide super-blocks (its rows must be multiples of 256).
    pub fn has_k_blocks(self) -> bool {
        matches!(
            self,
            SynthQuant::Q4K
                | SynthQuant::Q5K
                | SynthQuant::Q6K
                | SynthQuant::Q4KM
                | SynthQuant::Q5KM
        )
    }

    fn base(self) -> TensorType {
        match self {
            SynthQuant::Q4_0 => TensorType::Q4_0,
            SynthQuant::Q4_1 => TensorType::Q4_1,
            SynthQuant::Q5_0 => TensorType::Q5_0,
            SynthQuant::Q5_1 => TensorType::Q5_1,
            SynthQuant::Q8_0 => TensorType::Q8_0,
            SynthQuant::Q4K | SynthQuant::Q4KM => TensorType::Q4_K,
            SynthQuant::Q5K | SynthQuant::Q5KM => TensorType::Q5_K,
            SynthQuant::Q6K => TensorType::Q6_K,
            SynthQuant::F16 => TensorType::F16,
        }
    }

    /// The type of the block matrix `name` (`attn_q`, `ffn_down`...).
    pub fn matrix(self, name: &str) -> TensorType {
        match (self, name) {
            (SynthQuant::Q4KM | SynthQuant::Q5KM, "attn_v" | "ffn_down") => TensorType::Q6_K,
            _ => self.base(),
        }
    }

    /// The type of the token embedding.
    pub fn embedding(self) -> TensorType {
        self.base()
    }

    /// The type of the output head.
    pub fn output(self) -> TensorType {
        match self {
            SynthQuant::Q4KM | SynthQuant::Q5KM => TensorType::Q6_K,
            _ => self.base(),
        }
    }
}

/// xorshift64*: fast, seeded, good enough for random weights.
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is taken as 1).
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

/// `(elements, bytes)` of one block of `t`.
fn block(t: TensorType) -> (usize, usize) {
    match t {
        TensorType::Q4_0 => (32, 18),
        TensorType::Q4_1 => (32, 20),
        TensorType::Q5_0 => (32, 22),
        TensorType::Q5_1 => (32, 24),
        TensorType::Q8_0 => (32, 34),
        TensorType::Q4_K => (256, 144),
        TensorType::Q5_K => (256, 176),
        TensorType::Q6_K => (256, 210),
        _ => (1, 2),
    }
}

/// Random bytes of a `rows × cols` matrix (`cols` along a row) of type `t`: random quants,
/// with each block's scales (and mins, set to centre the values) about ±0.02 overall.
pub(crate) fn matrix(rng: &mut Rng, t: TensorType, rows: u64, cols: u64) -> (TensorType, Vec<u8>) {
    let n = (rows * cols) as usize;
    let (elems, bytes) = block(t);
    let mut v = vec![0u8; n / elems * bytes];
    if t == TensorType::F16 {
        for w in v.chunks_mut(2) {
            let u = rng.unit();
            w.copy_from_slice(&half::f16::from_f32((u - 0.5) * 0.04).to_le_bytes());
        }
        return (t, v);
    }
    for b in v.chunks_mut(bytes) {
        rng.fill(b);
        let u = 0.5 + 0.5 * rng.unit();
        match t {
            TensorType::Q4_0 => put_f16(b, 0, 0.003 * u),
            TensorType::Q4_1 => {
                put_f16(b, 0, 0.003 * u);
                put_f16(b, 2, -0.003 * u * 7.5);
            }
            TensorType::Q5_0 => put_f16(b, 0, 0.0015 * u),
            TensorType::Q5_1 => {
                put_f16(b, 0, 0.0015 * u);
                put_f16(b, 2, -0.0015 * u * 15.5);
            }
            TensorType::Q8_0 => put_f16(b, 0, 0.0002 * u),
            // d, dmin, 12 bytes of 6-bit scales and mins, quants: value d·sc·q − dmin·m.
            TensorType::Q4_K => {
                put_f16(b, 0, 4e-5 * u);
                put_f16(b, 2, 4e-5 * u * 7.5);
            }
            TensorType::Q5_K => {
                put_f16(b, 0, 2e-5 * u);
                put_f16(b, 2, 2e-5 * u * 15.5);
            }
            // low bits, high bits, 16 signed 8-bit scales, d last: value d·sc·(q − 32).
            TensorType::Q6_K => put_f16(b, 208, 1e-5 * u),
            _ => {}
        }
    }
    (t, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_mixes_pick_q6k_for_values_and_down() {
        for (name, q) in NAMES {
            assert_eq!(name.parse::<SynthQuant>(), Ok(q));
            assert_eq!(q.to_string(), name);
        }
        assert!("q3_k".parse::<SynthQuant>().is_err());
        let m = SynthQuant::Q4KM;
        assert_eq!(m.matrix("attn_q"), TensorType::Q4_K);
        assert_eq!(m.matrix("ffn_down"), TensorType::Q6_K);
        assert_eq!(m.output(), TensorType::Q6_K);
        assert!(m.has_k_blocks() && !SynthQuant::Q5_0.has_k_blocks());
    }
}
