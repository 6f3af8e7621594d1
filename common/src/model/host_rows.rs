//! Row-wise CPU versions of the elementwise ops between a block's products (RMSNorm, and SiLU
//! times the up projection), each row a task of [`crate::kernels::pool`]: with candle's ops
//! these ran on one thread while the pool's other threads spun. Every element is computed
//! with exactly candle's expression, so the results are bit for bit candle's (tested below).
//! Tensors not on the CPU, or not f32, go to candle's ops.

use candle_core::{DType, Device, Storage, Tensor};

use crate::error::{Error, Result};
use crate::gguf::Activation;
use crate::kernels::pool::parallel_chunks_mut;

/// Rows of a CPU f32 tensor `[n, width]`, possibly a column slice of a wider one.
pub(crate) struct Rows<'a> {
    data: &'a [f32],
    off: usize,
    stride: usize,
    width: usize,
}

impl Rows<'_> {
    pub(crate) fn row(&self, r: usize) -> &[f32] {
        let a = self.off + r * self.stride;
        &self.data[a..a + self.width]
    }
}

/// Calls `f` with the rows of `t`.
pub(crate) fn with_rows<R>(t: &Tensor, f: impl FnOnce(&Rows<'_>) -> R) -> Result<R> {
    let (_, width) = t.dims2()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::InvalidInput(
            "host rows of a tensor not on the CPU".into(),
        ));
    };
    let data = cpu.as_slice::<f32>()?;
    let (off, stride) = (layout.start_offset(), layout.stride());
    if stride.get(1) != Some(&1) && width > 1 {
        return Err(Error::InvalidInput(
            "host rows: a row is not contiguous".into(),
        ));
    }
    Ok(f(&Rows {
        data,
        off,
        stride: stride[0],
        width,
    }))
}

fn host_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2
}

/// `candle_nn::ops::rms_norm(x, alpha, eps)` for `x: [n, h]`.
pub fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    if !host_f32(x) || !x.is_contiguous() || alpha.dtype() != DType::F32 || !alpha.device().is_cpu()
    {
        return Ok(candle_nn::ops::rms_norm(x, alpha, eps)?);
    }
    let (n, h) = x.dims2()?;
    if alpha.elem_count() != h {
        return Err(Error::InvalidInput(format!(
            "rms_norm: {} weights for rows of {h}",
            alpha.elem_count()
        )));
    }
    let alpha = alpha.reshape((1, h))?;
    let mut out = vec![0f32; n * h];
    with_rows(x, |rows| {
        with_rows(&alpha, |al| {
            let alpha = al.row(0);
            parallel_chunks_mut(&mut out, h, |r, dst| {
                let src = rows.row(r);
                let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
                let m = (sum2 / h as f32 + eps).sqrt();
                for ((d, s), a) in dst.iter_mut().zip(src).zip(alpha) {
                    *d = *s / m * *a
                }
            })
        })
    })??;
    Ok(Tensor::from_vec(out, (n, h), &Device::Cpu)?)
}

/// `silu(g) * u` for `g`, `u: [n, w]` (column slices of one tensor are fine).
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    gate_mul(g, u, Activation::Silu)
}

/// `act(g) * u` for `g`, `u: [n, w]` (column slices of one tensor are fine). On the CPU the
/// GELU is llama.cpp's (see [`gelu_mul_row`]); elsewhere candle's tanh approximation.
pub fn gate_mul(g: &Tensor, u: &Tensor, act: Activation) -> Result<Tensor> {
    if !host_f32(g) || !host_f32(u) || g.dims() != u.dims() {
        return Ok(match act {
            Activation::Silu => (candle_nn::ops::silu(g)? * u)?,
            Activation::GeluTanh => (g.gelu()? * u)?,
        });
    }
    let (n, w) = g.dims2()?;
    let row_fn = row_fn(act);
    let mut out = vec![0f32; n * w];
    with_rows(g, |gr| {
        with_rows(u, |ur| {
            parallel_chunks_mut(&mut out, w, |r, dst| row_fn(gr.row(r), ur.row(r), dst))
        })
    })??;
    Ok(Tensor::from_vec(out, (n, w), &Device::Cpu)?)
}

/// [`silu_mul`] of rows `[gate | up]` of `2 w` values each, `y` holding them row-major.
pub fn silu_mul_halves(y: &[f32], w: usize) -> Result<Tensor> {
    gate_mul_halves(y, w, Activation::Silu)
}

/// [`gate_mul`] of rows `[gate | up]` of `2 w` values each, `y` holding them row-major.
pub fn gate_mul_halves(y: &[f32], w: usize, act: Activation) -> Result<Tensor> {
    let n = y.len() / (2 * w).max(1);
    let row_fn = row_fn(act);
    let mut out = vec![0f32; n * w];
    parallel_chunks_mut(&mut out, w, |r, dst| {
        let row = &y[r * 2 * w..(r + 1) * 2 * w];
        row_fn(&row[..w], &row[w..], dst)
    });
    Ok(Tensor::from_vec(out, (n, w), &Device::Cpu)?)
}

fn row_fn(act: Activation) -> fn(&[f32], &[f32], &mut [f32]) {
    match act {
        Activation::Silu => silu_mul_row,
        Activation::GeluTanh => gelu_mul_row,
    }
}

/// `gelu_tanh(v) * b` as llama.cpp's CPU backend forms it: the GELU looked up for the
/// f16-rounded input in a table of f16 values (0 below -10, the identity above 10).
fn gelu_mul_row(g: &[f32], u: &[f32], dst: &mut [f32]) {
    for ((d, &v), &b) in dst.iter_mut().zip(g).zip(u) {
        let a = if v <= -10.0 {
            0.0
        } else if v >= 10.0 {
            v
        } else {
            let x = half::f16::from_f32(v).to_f32();
            half::f16::from_f32(gelu_tanh(x)).to_f32()
        };
        *d = a * b;
    }
}

/// The tanh approximation of GELU, in llama.cpp's arrangement.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh())
}

/// RMS norm of each `width`-wide piece of each row of `x: [n, pieces * width]`, times
/// `alpha: [width]` (the per-head query and key norms of qwen3 and gemma 3).
pub fn rms_norm_heads(x: &Tensor, alpha: &Tensor, width: usize, eps: f32) -> Result<Tensor> {
    let (n, w) = x.dims2()?;
    if width == 0 || !w.is_multiple_of(width) {
        return Err(Error::InvalidInput(format!(
            "rms_norm_heads: rows of {w} do not split into heads of {width}"
        )));
    }
    let y = rms_norm(
        &x.contiguous()?.reshape((n * (w / width), width))?,
        alpha,
        eps,
    )?;
    Ok(y.reshape((n, w))?)
}

/// candle's `silu(v) * b`, element by element.
fn silu_mul_row(g: &[f32], u: &[f32], dst: &mut [f32]) {
    for ((d, &v), &b) in dst.iter_mut().zip(g).zip(u) {
        *d = v / (1.0 + (-v).exp()) * b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, w: usize, salt: f32) -> Result<Tensor> {
        let v: Vec<f32> = (0..n * w)
            .map(|i| ((i as f32) * 0.37 + salt).sin() * 4.0)
            .collect();
        Ok(Tensor::from_vec(v, (n, w), &Device::Cpu)?)
    }

    fn same_bits(a: &Tensor, b: &Tensor) -> Result<bool> {
        let (a, b): (Vec<f32>, Vec<f32>) =
            (a.flatten_all()?.to_vec1()?, b.flatten_all()?.to_vec1()?);
        Ok(a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()))
    }

    #[test]
    fn gelu_follows_the_f16_table_and_candle_closely() -> Result<()> {
        let g = data(3, 64, 0.1)?;
        let u = data(3, 64, 0.7)?;
        let ours = gate_mul(&g, &u, Activation::GeluTanh)?;
        let exact = (g.gelu()? * &u)?;
        let diff = (ours - exact)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        // f16 rounding of |gelu| < 4 and of its input: a few thousandths, times |u| < 4.
        assert!(diff > 0.0 && diff < 0.05, "diff {diff}");
        let mut d = [0f32; 3];
        gelu_mul_row(&[-11.0, 12.0, 0.0], &[2.0, 2.0, 2.0], &mut d);
        assert_eq!(d, [0.0, 24.0, 0.0]);
        Ok(())
    }

    #[test]
    fn rows_equal_candle_ops_bit_for_bit() -> Result<()> {
        for n in [1usize, 3, 16, 40] {
            let x = data(n, 96, 0.5)?;
            let alpha = data(1, 96, 2.0)?.flatten_all()?;
            let want = candle_nn::ops::rms_norm(&x, &alpha, 1e-5)?;
            assert!(
                same_bits(&rms_norm(&x, &alpha, 1e-5)?, &want)?,
                "rms_norm n={n}"
            );
            // Column slices of one product, as the fused gate/up projection gives them.
            let gu = data(n, 2 * 80, 1.5)?;
            let (g, u) = (gu.narrow(1, 0, 80)?, gu.narrow(1, 80, 80)?);
            let want = (candle_nn::ops::silu(&g)? * &u)?;
            assert!(same_bits(&silu_mul(&g, &u)?, &want)?, "silu_mul n={n}");
            let flat: Vec<f32> = gu.flatten_all()?.to_vec1()?;
            assert!(
                same_bits(&silu_mul_halves(&flat, 80)?, &want)?,
                "halves n={n}"
            );
        }
        Ok(())
    }
}
