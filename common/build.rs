//! With the `cuda` feature, compiles `src/cuda/*.cu` to PTX with `nvcc` (from `$NVCC`,
//! `$CUDA_HOME/bin` or the `PATH`) for the virtual architecture `compute_$CUDA_COMPUTE_CAP`,
//! else `compute_75`: the kernels need nothing newer, and the driver compiles the PTX for the
//! GPU it loads on. Without the feature it does nothing.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").ok().unwrap_or_else(|| {
        std::env::var("CUDA_HOME")
            .map(|h| format!("{h}/bin/nvcc"))
            .ok()
            .filter(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| "nvcc".into())
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().replace('.', ""))
        .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_digit()))
        .unwrap_or_else(|| "75".into());
    // The kernels wait for their predecessor (programmatic dependent launch) only when built
    // for sm_90 or later; `matvec.rs` launches them that way only then.
    println!("cargo:rustc-env=LLMC_CUDA_PTX_ARCH={cap}");
    println!("cargo:rerun-if-changed=src/cuda/q8_1.cuh");
    println!("cargo:rerun-if-changed=src/cuda/decode_attention_grouped.cuh");
    let kernels: &[&str] = &[
        "argmax",
        "decode_attention",
        "dequant_f16",
        "fused_decode",
        "gate_mul",
        "matvec",
        "prefill_attention",
    ];
    for name in kernels {
        let src = format!("src/cuda/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch=compute_{cap}"),
                "-o",
            ])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run nvcc ({nvcc}): {e}; set NVCC or CUDA_HOME"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
