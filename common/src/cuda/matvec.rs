//! Our quantized matrix-vector products for decode steps, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
//! Q5_K and Q6_K weights against Q8_1 activations (kernels in `matvec.cu`, whose header says
//! how they differ from candle's `mmvq`). They take the same arguments as candle's mmvq launchers, so the fused decode path
//! calls whichever applies: these where [`MatvecType::of`] accepts the weight, candle's
//! otherwise. `--cuda-matvec off` (or `LLMC_CUDA_MATVEC=0`) turns them off, so one run can
//! compare both.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};
use candle_core::cuda_backend::CudaDevice;
use candle_core::quantized::GgmlDType;

use super::pdl::{self, arg};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/matvec.ptx"));
const MODULE: &str = "llm_cluster_matvec";
/// The most activation rows one launch takes.
pub(crate) const MAX_COLS: usize = 8;
/// Rows a CTA takes (`CTA_ROWS` in the kernel).
const CTA_ROWS: usize = 8;
/// Blocks of 32 values a pass (`PASS` in the kernel).
const PASS: usize = 128;
/// Bytes of one Q8_1 block of 32 values (`block_q8_1` in `q8_1.cuh`).
pub(crate) const Q8_1_BYTES: usize = 36;

/// Whether the kernels are on ([`crate::cuda_options::CudaOptions::matvec`], default on).
pub fn enabled() -> bool {
    crate::cuda_options::get().matvec
}

/// A weight type the kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MatvecType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl MatvecType {
    /// Every type, in the order [`MatvecFuncs`] holds their kernels.
    pub(crate) const ALL: [MatvecType; 8] = [
        MatvecType::Q4_0,
        MatvecType::Q4_1,
        MatvecType::Q5_0,
        MatvecType::Q5_1,
        MatvecType::Q8_0,
        MatvecType::Q4K,
        MatvecType::Q5K,
        MatvecType::Q6K,
    ];

    /// The kernels' type for a weight of `t` with rows of `cols` values at device address
    /// `ptr`, if they take it: a type above, whole groups of 256 values a row (2048 for Q6_K,
    /// whose 210-byte blocks need 8 to a 16-byte boundary) so that rows and passes start
    /// 16-byte aligned, and a 16-byte-aligned start.
    pub(crate) fn of(t: GgmlDType, cols: usize, ptr: u64) -> Option<Self> {
        if !enabled() || cols == 0 || !cols.is_multiple_of(256) || !ptr.is_multiple_of(16) {
            return None;
        }
        let t = match t {
            GgmlDType::Q4_0 => MatvecType::Q4_0,
            GgmlDType::Q4_1 => MatvecType::Q4_1,
            GgmlDType::Q5_0 => MatvecType::Q5_0,
            GgmlDType::Q5_1 => MatvecType::Q5_1,
            GgmlDType::Q8_0 => MatvecType::Q8_0,
            GgmlDType::Q4K => MatvecType::Q4K,
            GgmlDType::Q5K => MatvecType::Q5K,
            GgmlDType::Q6K => MatvecType::Q6K,
            _ => return None,
        };
        (t.group_bytes() * (cols / 256))
            .is_multiple_of(16)
            .then_some(t)
    }

    fn name(self) -> &'static str {
        match self {
            MatvecType::Q4_0 => "q4_0",
            MatvecType::Q4_1 => "q4_1",
            MatvecType::Q5_0 => "q5_0",
            MatvecType::Q5_1 => "q5_1",
            MatvecType::Q8_0 => "q8_0",
            MatvecType::Q4K => "q4_k",
            MatvecType::Q5K => "q5_k",
            MatvecType::Q6K => "q6_k",
        }
    }

    /// Its index in [`MatvecType::ALL`].
    fn index(self) -> usize {
        self as usize
    }

    /// Warps a CTA for `cols` activation rows, as `MATVEC_COLS` in the kernel instantiates
    /// them: 4 warps of two rows for Q8_0 and for more than one activation row, 8 warps of
    /// one otherwise.
    fn warps(self, cols: usize) -> usize {
        if self != MatvecType::Q8_0 && cols == 1 {
            8
        } else {
            4
        }
    }

    /// Bytes of 256 values (`G8` in the kernel's formats).
    fn group_bytes(self) -> usize {
        match self {
            MatvecType::Q4_0 => 8 * 18,
            MatvecType::Q4_1 => 8 * 20,
            MatvecType::Q5_0 => 8 * 22,
            MatvecType::Q5_1 => 8 * 24,
            MatvecType::Q8_0 => 8 * 34,
            MatvecType::Q4K => 144,
            MatvecType::Q5K => 176,
            MatvecType::Q6K => 210,
        }
    }
}

/// The dynamic shared memory of a CTA: a pass of each activation row, then a pass of each of
/// its rows.
fn smem_bytes(t: MatvecType, cols: usize) -> usize {
    cols * PASS * Q8_1_BYTES + CTA_ROWS * PASS / 8 * t.group_bytes()
}

/// The kernels for one number of activation rows, by type.
pub(crate) struct MatvecFuncs {
    cols: usize,
    funcs: Vec<CudaFunction>,
}

impl MatvecFuncs {
    /// The kernels for `cols` (1 to [`MAX_COLS`]) activation rows, on `dev`'s stream.
    pub(crate) fn load(dev: &CudaDevice, cols: usize) -> candle_core::Result<Self> {
        if !(1..=MAX_COLS).contains(&cols) {
            candle_core::bail!("matvec: {cols} activation rows, at most {MAX_COLS} a launch");
        }
        let f = |t: MatvecType| -> candle_core::Result<CudaFunction> {
            let f = dev
                .get_or_load_custom_func(&format!("matvec_{}_c{cols}", t.name()), MODULE, PTX)?
                .into_cuda_function();
            // Past 48 KiB a kernel must ask for its dynamic shared memory.
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes(t, cols) as i32,
            )
            .map_err(|e| candle_core::Error::Msg(format!("matvec: shared memory: {e:?}")))?;
            Ok(f)
        };
        Ok(MatvecFuncs {
            cols,
            funcs: MatvecType::ALL
                .into_iter()
                .map(f)
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// `dst[c * stride_dst + r] = w[r] · y[c]` for the `cols` activation rows these kernels
    /// were loaded for, with candle's mmvq arguments: `w` is `[rows, k]` of type `t`, `y`
    /// holds Q8_1 rows of `stride_y` blocks.
    ///
    /// # Safety
    /// The addresses must point into live device buffers of those sizes, `t` must come from
    /// [`MatvecType::of`] for this `w` and `k`, and `y` must be 16-byte aligned with
    /// `stride_y` a multiple of 4 blocks of at least `k / 32`, and hold the `cols` rows these
    /// kernels were loaded for.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch(
        &self,
        stream: &CudaStream,
        t: MatvecType,
        w: u64,
        y: u64,
        dst: u64,
        (rows, k): (usize, usize),
        (stride_y, stride_dst): (usize, usize),
    ) -> candle_core::Result<()> {
        let f = &self.funcs[t.index()];
        let int = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("matvec: {what} {v}")))
        };
        let (k, nrows, sy, sd) = (
            int(k, "width")?,
            int(rows, "rows")?,
            int(stride_y, "activation stride")?,
            int(stride_dst, "output stride")?,
        );
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(CTA_ROWS) as u32, 1, 1),
            block_dim: ((t.warps(self.cols) * 32) as u32, 1, 1),
            shared_mem_bytes: smem_bytes(t, self.cols) as u32,
        };
        let (mut w, mut y, mut dst) = (w, y, dst);
        let (mut k, mut nrows, mut sy, mut sd) = (k, nrows, sy, sd);
        let mut params = [
            arg(&mut w),
            arg(&mut y),
            arg(&mut dst),
            arg(&mut k),
            arg(&mut nrows),
            arg(&mut sy),
            arg(&mut sd),
        ];
        // SAFETY: the caller's contract above; the kernel waits for its predecessor before
        // it reads the activations or writes anything.
        unsafe { pdl::launch(stream, f, cfg, &mut params, true) }
            .map_err(|e| candle_core::Error::Msg(format!("matvec: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::Device;
    use half::f16;

    use super::*;
    use crate::error::{Error, Result};

    /// A small deterministic generator (xorshift), so the test needs no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn byte(&mut self) -> u8 {
            (self.next() >> 32) as u8
        }
        fn scale(&mut self) -> f16 {
            f16::from_f32(((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 0.02 + 0.001)
        }
    }

    fn drv(e: impl std::fmt::Debug) -> Error {
        Error::InvalidInput(format!("cuda: {e:?}"))
    }

    impl MatvecType {
        fn ggml(self) -> GgmlDType {
            match self {
                MatvecType::Q4_0 => GgmlDType::Q4_0,
                MatvecType::Q4_1 => GgmlDType::Q4_1,
                MatvecType::Q5_0 => GgmlDType::Q5_0,
                MatvecType::Q5_1 => GgmlDType::Q5_1,
                MatvecType::Q8_0 => GgmlDType::Q8_0,
                MatvecType::Q4K => GgmlDType::Q4K,
                MatvecType::Q5K => GgmlDType::Q5K,
                MatvecType::Q6K => GgmlDType::Q6K,
            }
        }

        /// Values a block, its bytes, and the byte offsets of its f16 scales.
        fn layout(self) -> (usize, usize, &'static [usize]) {
            match self {
                MatvecType::Q4_0 => (32, 18, &[0]),
                MatvecType::Q4_1 => (32, 20, &[0, 2]),
                MatvecType::Q5_0 => (32, 22, &[0]),
                MatvecType::Q5_1 => (32, 24, &[0, 2]),
                MatvecType::Q8_0 => (32, 34, &[0]),
                MatvecType::Q4K => (256, 144, &[0, 2]),
                MatvecType::Q5K => (256, 176, &[0, 2]),
                MatvecType::Q6K => (256, 210, &[208]),
            }
        }
    }

    /// Random GGUF blocks for a `[rows, k]` weight (random bytes, with small positive f16
    /// scales), and its values as candle's CPU dequantization gives them.
    fn weight(t: MatvecType, rows: usize, k: usize, rng: &mut Rng) -> Result<(Vec<u8>, Vec<f64>)> {
        let (per, size, scales) = t.layout();
        let mut bytes = Vec::with_capacity(rows * k / per * size);
        for _ in 0..rows * k / per {
            let at = bytes.len();
            bytes.extend((0..size).map(|_| rng.byte()));
            for &o in scales {
                bytes[at + o..at + o + 2].copy_from_slice(&rng.scale().to_le_bytes());
            }
        }
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            t.ggml(),
            &bytes,
            vec![rows, k],
            &Device::Cpu,
        )?;
        let vals = q
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((bytes, vals.into_iter().map(f64::from).collect()))
    }

    /// Random Q8_1 rows of `stride` blocks (zero past `k`), and their values as f64. The sum
    /// half is the sum of the quantized values, as a quantizer of exact inputs would write.
    fn activations(cols: usize, k: usize, stride: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f64>) {
        let mut bytes = vec![0u8; cols * stride * 36];
        let mut vals = vec![0f64; cols * k];
        for c in 0..cols {
            for b in 0..k / 32 {
                let d = rng.scale();
                let qs: Vec<i8> = (0..32).map(|_| rng.byte() as i8).collect();
                let x: Vec<f64> = qs
                    .iter()
                    .map(|&q| f64::from(q) * f64::from(d.to_f32()))
                    .collect();
                let s = f16::from_f64(x.iter().sum());
                let at = (c * stride + b) * 36;
                bytes[at..at + 2].copy_from_slice(&d.to_le_bytes());
                bytes[at + 2..at + 4].copy_from_slice(&s.to_le_bytes());
                for (i, q) in qs.iter().enumerate() {
                    bytes[at + 4 + i] = *q as u8;
                }
                vals[c * k + b * 32..c * k + b * 32 + 32].copy_from_slice(&x);
            }
        }
        (bytes, vals)
    }

    /// The kernels against the products computed on the host in f64 from the same blocks,
    /// and against candle's mmvq on the same device buffers: every type, 1 to 8 activation
    /// rows, row counts that leave CTAs and warps partly empty, and widths of 8 blocks, of
    /// less than one pass of 128 blocks, of one pass, and of several passes with a tail.
    /// Needs a GPU: run the test binary of a `cuda` build on the GPU machine.
    #[test]
    fn matches_host_and_candle() -> Result<()> {
        use candle_core::cuda_backend::kernels::ffi;
        let dev = Device::new_cuda(0)?;
        let Device::Cuda(cuda) = &dev else {
            unreachable!("a CUDA device");
        };
        let stream = cuda.cuda_stream();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut worst = 0f64;
        for t in MatvecType::ALL {
            for (rows, k) in [
                (5usize, 256usize),
                (37, 768),
                (4102, 4096),
                (301, 8448),
                (19, 14336),
            ] {
                if t == MatvecType::Q6K && !k.is_multiple_of(2048) {
                    continue;
                }
                let (wb, wv) = weight(t, rows, k, &mut rng)?;
                let stride = k.div_ceil(512) * 16;
                let (yb, yv) = activations(MAX_COLS, k, stride, &mut rng);
                let w_dev = stream.clone_htod(&wb).map_err(drv)?;
                let y_dev = stream.clone_htod(&yb).map_err(drv)?;
                let gt = t.ggml();
                let (wp, yp) = (w_dev.device_ptr(&stream).0, y_dev.device_ptr(&stream).0);
                assert_eq!(MatvecType::of(gt, k, wp), Some(t));
                for cols in 1..=MAX_COLS {
                    let funcs = MatvecFuncs::load(cuda, cols)?;
                    let ours = stream.alloc_zeros::<f32>(cols * rows).map_err(drv)?;
                    let theirs = stream.alloc_zeros::<f32>(cols * rows).map_err(drv)?;
                    // SAFETY: the buffers above hold these shapes; `of` accepted the weight.
                    unsafe {
                        funcs.launch(
                            &stream,
                            t,
                            wp,
                            yp,
                            ours.device_ptr(&stream).0,
                            (rows, k),
                            (stride, rows),
                        )?;
                        let mmvq = match t {
                            MatvecType::Q4_0 => ffi::launch_mmvq_gguf_q4_0_f32_plain,
                            MatvecType::Q4_1 => ffi::launch_mmvq_gguf_q4_1_f32_plain,
                            MatvecType::Q5_0 => ffi::launch_mmvq_gguf_q5_0_f32_plain,
                            MatvecType::Q5_1 => ffi::launch_mmvq_gguf_q5_1_f32_plain,
                            MatvecType::Q8_0 => ffi::launch_mmvq_gguf_q8_0_f32_plain,
                            MatvecType::Q4K => ffi::launch_mmvq_gguf_q4_k_f32_plain,
                            MatvecType::Q5K => ffi::launch_mmvq_gguf_q5_k_f32_plain,
                            MatvecType::Q6K => ffi::launch_mmvq_gguf_q6_k_f32_plain,
                        };
                        mmvq(
                            wp as *const _,
                            yp as *const _,
                            theirs.device_ptr(&stream).0 as *mut _,
                            k as i32,
                            rows as i32,
                            stride as i32,
                            rows as i32,
                            cols as i32,
                            stream.cu_stream() as *mut _,
                        );
                    }
                    let ours = stream.clone_dtoh(&ours).map_err(drv)?;
                    let theirs = stream.clone_dtoh(&theirs).map_err(drv)?;
                    for c in 0..cols {
                        for r in 0..rows {
                            let exact: f64 = (0..k).map(|i| wv[r * k + i] * yv[c * k + i]).sum();
                            // The row's scale: what rounding of its terms is measured against.
                            let mag: f64 = (0..k)
                                .map(|i| (wv[r * k + i] * yv[c * k + i]).abs())
                                .sum::<f64>()
                                .max(1e-30);
                            let (o, m) = (
                                f64::from(ours[c * rows + r]),
                                f64::from(theirs[c * rows + r]),
                            );
                            let e = ((o - exact).abs() / mag).max((o - m).abs() / mag);
                            worst = worst.max(e);
                            if e > 1e-3 {
                                return Err(Error::InvalidInput(format!(
                                    "{t:?} [{rows}, {k}] x {cols}: row {r} col {c}: ours {o}, \
                                     candle {m}, exact {exact}"
                                )));
                            }
                        }
                    }
                }
            }
        }
        eprintln!("matvec: worst error relative to the sum of |terms|: {worst:e}");
        Ok(())
    }
}
