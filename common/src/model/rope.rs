//! Rotary position embeddings with llama.cpp's frequencies, applied at arbitrary positions.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

use crate::error::Result;
use crate::gguf::RopeStyle;

/// Precomputed cos/sin tables for positions `0..max_pos`.
#[derive(Debug, Clone)]
pub struct Rope {
    style: RopeStyle,
    half: usize,
    cos: Tensor,
    sin: Tensor,
    /// Host copies for the CPU fast path (`[max_pos * half]`), empty on other devices.
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
}

/// How a model stretches RoPE past its training length.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RopeScaling {
    /// Positions are divided by this (`rope.scaling.type = linear`); 1 or 0 for none.
    pub linear: f32,
    /// Per-frequency divisors (llama 3.1's `rope_freqs.weight`, `head_dim / 2` of them).
    pub freq_factors: Option<Vec<f32>>,
}

impl Rope {
    /// Tables for heads of `head_dim` with base `base`, up to `max_pos` positions.
    pub fn new(
        style: RopeStyle,
        head_dim: usize,
        base: f32,
        max_pos: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::scaled(
            style,
            head_dim,
            base,
            &RopeScaling::default(),
            max_pos,
            device,
        )
    }

    /// As [`Rope::new`], with the model's scaling: the angle of pair `i` at position `p` is
    /// `p / linear * base^(-2i/d) / freq_factors[i]`.
    pub fn scaled(
        style: RopeStyle,
        head_dim: usize,
        base: f32,
        scaling: &RopeScaling,
        max_pos: usize,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        if let Some(f) = &scaling.freq_factors {
            if f.len() != half || f.iter().any(|&x| !(x.is_finite() && x > 0.0)) {
                return Err(crate::error::Error::InvalidInput(format!(
                    "rope frequency factors: {} values, expected {half} positive ones",
                    f.len()
                )));
            }
        }
        let linear = if scaling.linear > 0.0 {
            f64::from(scaling.linear)
        } else {
            1.0
        };
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let mut theta = f64::from(base).powf(-2.0 * i as f64 / head_dim as f64) / linear;
                if let Some(f) = &scaling.freq_factors {
                    theta /= f64::from(f[i]);
                }
                let a = p as f64 * theta;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let cos_t = Tensor::from_slice(&cos, (max_pos, half), device)?;
        let sin_t = Tensor::from_slice(&sin, (max_pos, half), device)?;
        let (cos_host, sin_host) = if device.is_cpu() {
            (cos, sin)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Rope {
            style,
            half,
            cos: cos_t,
            sin: sin_t,
            cos_host,
            sin_host,
        })
    }

    /// Rotates `x: [n, heads * head_dim]` whose rows sit at positions `start..start + n`.
    pub fn apply(&self, x: &Tensor, heads: usize, start: usize) -> Result<Tensor> {
        let (n, width) = x.dims2()?;
        if x.device().is_cpu() && !self.cos_host.is_empty() {
            let op = RopeCpu {
                rope: self,
                heads,
                start,
            };
            return Ok(x.contiguous()?.apply_op1_no_bwd(&op)?);
        }
        let hd = width / heads;
        let cos = self.cos.narrow(0, start, n)?;
        let sin = self.sin.narrow(0, start, n)?;
        let xs = x
            .reshape((n, heads, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?;
        let y = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&xs, &cos, &sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&xs, &cos, &sin)?,
        };
        Ok(y.squeeze(0)?.transpose(0, 1)?.reshape((n, width))?)
    }

    /// The head width the tables are for.
    pub fn head_dim(&self) -> usize {
        2 * self.half
    }

    /// Whether [`Rope::rotate_row`] can run (the tables were built for the CPU).
    pub fn has_host_tables(&self) -> bool {
        !self.cos_host.is_empty()
    }

    /// Rotates one row `x` of `heads` heads at position `pos` into `y` (same length), from
    /// the host tables. The caller checks `pos` against the table and the widths.
    pub fn rotate_row(&self, x: &[f32], y: &mut [f32], heads: usize, pos: usize) {
        let half = self.half;
        let hd = 2 * half;
        let cos = &self.cos_host[pos * half..(pos + 1) * half];
        let sin = &self.sin_host[pos * half..(pos + 1) * half];
        for h in 0..heads {
            let (xi, yo) = (&x[h * hd..(h + 1) * hd], &mut y[h * hd..(h + 1) * hd]);
            match self.style {
                RopeStyle::Interleaved => {
                    for i in 0..half {
                        let (x0, x1) = (xi[2 * i], xi[2 * i + 1]);
                        yo[2 * i] = x0 * cos[i] - x1 * sin[i];
                        yo[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
                    }
                }
                RopeStyle::Halves => {
                    for i in 0..half {
                        let (x0, x1) = (xi[i], xi[i + half]);
                        yo[i] = x0 * cos[i] - x1 * sin[i];
                        yo[i + half] = x0 * sin[i] + x1 * cos[i];
                    }
                }
            }
        }
    }

    /// The `[max_pos, head_dim / 2]` cos and sin tables on the device.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// How pairs are formed.
    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// Positions the tables cover.
    pub fn max_pos(&self) -> usize {
        self.cos.dims().first().copied().unwrap_or(0)
    }
}

struct RopeCpu<'a> {
    rope: &'a Rope,
    heads: usize,
    start: usize,
}

impl CustomOp1 for RopeCpu<'_> {
    fn name(&self) -> &'static str {
        "rope-cpu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("rope needs a contiguous input".into()))?;
        let x = &storage.as_slice::<f32>()?[a..b];
        let (n, width) = layout.shape().dims2()?;
        let half = self.rope.half;
        let hd = 2 * half;
        if width != self.heads * hd {
            candle_core::bail!("rope: width {width} is not {} heads of {hd}", self.heads);
        }
        if (self.start + n) * half > self.rope.cos_host.len() {
            candle_core::bail!("rope: position {} is past the table", self.start + n);
        }
        let mut out = vec![0f32; x.len()];
        for t in 0..n {
            let span = t * width..(t + 1) * width;
            self.rope
                .rotate_row(&x[span.clone()], &mut out[span], self.heads, self.start + t);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}
