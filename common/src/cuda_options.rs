//! [`CudaOptions`]: the switches of our CUDA kernels, for comparisons against candle's own
//! ops. A binary parses them once at start (flags, with the `LLMC_CUDA_*` environment
//! variables as fallback) and [`set`]s them; the kernels read them with [`get`]. They change
//! nothing on the CPU.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Which of our CUDA kernels run (all by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    /// Our decode-attention kernels (`LLMC_CUDA_ATTENTION`); off: candle's ops throughout.
    pub attention: bool,
    /// Steps that mix a prefill chunk with decode rows use them too (`LLMC_CUDA_MIXED`).
    pub mixed: bool,
    /// The fused decode step (`LLMC_CUDA_FUSED`); needs `attention`.
    pub fused: bool,
    /// Our matrix-vector kernels (`LLMC_CUDA_MATVEC`).
    pub matvec: bool,
    /// Launches that overlap the kernel before, on sm_90 and later (`LLMC_CUDA_PDL`).
    pub pdl: bool,
    /// Prompt chunks' attention on tensor cores (`LLMC_CUDA_PREFILL`); off: candle's ops.
    pub prefill: bool,
    /// Prompt chunks' gate `act(gate) * up` in one kernel (`LLMC_CUDA_GATE`); off: two
    /// candle ops.
    pub gate: bool,
    /// Prompt chunks' RoPE and KV-cache write in one kernel (`LLMC_CUDA_ROPE`); off: eleven
    /// candle ops.
    pub rope: bool,
    /// Prompt chunks' quantized products as cuBLAS products of f16 activations with the
    /// weight dequantized to f16 (`LLMC_CUDA_GEMM`, [`crate::cuda::f16_gemm`]); off:
    /// candle's MMQ (int8 tensor cores) for every product.
    pub gemm: bool,
    /// Fused decode steps of up to 8 rows replayed from CUDA graphs captured once per batch
    /// size (`LLMC_CUDA_GRAPHS`); off: launched kernel by kernel each step.
    pub graphs: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            attention: true,
            mixed: true,
            fused: true,
            matvec: true,
            pdl: true,
            prefill: true,
            gate: true,
            rope: true,
            gemm: true,
            graphs: true,
        }
    }
}

impl CudaOptions {
    /// Whether the fused step runs: it is on and so are the attention kernels (turning
    /// attention off selects candle's ops throughout).
    pub fn fused_step(&self) -> bool {
        self.fused && self.attention
    }

    /// Each switch by name, for logs and metrics.
    pub fn named(&self) -> [(&'static str, bool); 10] {
        [
            ("attention", self.attention),
            ("mixed", self.mixed),
            ("fused", self.fused),
            ("matvec", self.matvec),
            ("pdl", self.pdl),
            ("prefill", self.prefill),
            ("gate", self.gate),
            ("rope", self.rope),
            ("gemm", self.gemm),
            ("graphs", self.graphs),
        ]
    }
}

static OPTIONS: OnceLock<CudaOptions> = OnceLock::new();

/// Sets the options for this process; an error if others were set or read before.
pub fn set(o: CudaOptions) -> Result<()> {
    let now = *OPTIONS.get_or_init(|| o);
    if now != o {
        return Err(Error::Config(format!(
            "the CUDA options were already {now:?}; they are set once, at start"
        )));
    }
    Ok(())
}

/// The options in force ([`CudaOptions::default`] unless [`set`] was called first).
pub fn get() -> CudaOptions {
    *OPTIONS.get_or_init(CudaOptions::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_step_needs_the_attention_kernels() {
        let o = CudaOptions::default();
        assert!(o.fused_step());
        assert!(!CudaOptions {
            attention: false,
            ..o
        }
        .fused_step());
        // every switch on by default
        assert!(o.named().iter().all(|&(_, on)| on));
    }
}
