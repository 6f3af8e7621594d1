//! `shard-node`: the command line of a shard node.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};
use common::cuda_options::CudaOptions;
use common::device::DeviceSpec;
use common::sampling::SamplingParams;
use shard_node::bench_cmd::{self, BenchOptions};
use shard_node::generate_cmd::{self, GenerateOptions};

#[derive(Parser, Debug)]
#[command(
    name = "shard-node",
    version,
    about = "A shard node of the inference cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    cuda: CudaArgs,
}

/// Switches of our CUDA kernels, to compare them with candle's own ops (no effect on the
/// CPU). Each takes on/off (or 1/0, true/false); the environment variable is the fallback.
#[derive(Args, Debug)]
struct CudaArgs {
    /// Our decode-attention kernels; off selects candle's ops throughout.
    #[arg(long, global = true, help_heading = "CUDA kernels", hide_possible_values = true, env = "LLMC_CUDA_ATTENTION", default_value = "on",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    cuda_attention: bool,
    /// Steps that mix a prefill chunk with decode rows use the attention kernels too.
    #[arg(long, global = true, help_heading = "CUDA kernels", hide_possible_values = true, env = "LLMC_CUDA_MIXED", default_value = "on",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    cuda_mixed: bool,
    /// The fused decode step (needs the attention kernels).
    #[arg(long, global = true, help_heading = "CUDA kernels", hide_possible_values = true, env = "LLMC_CUDA_FUSED", default_value = "on",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    cuda_fused: bool,
    /// Our matrix-vector kernels.
    #[arg(long, global = true, help_heading = "CUDA kernels", hide_possible_values = true, env = "LLMC_CUDA_MATVEC", default_value = "on",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    cuda_matvec: bool,
    /// Launches overlapping the kernel before (sm_90 and later).
    #[arg(long, global = true, help_heading = "CUDA kernels", hide_possible_values = true, env = "LLMC_CUDA_PDL", default_value = "on",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    cuda_pdl: bool,
    /// Prompt chunks' attention on tensor cores (flash-attention style).
    #[arg(long, global = true, help_heading = "CUDA kernels", hide_possible_values = true, env = "LLMC_CUDA_PREFILL", default_value = "on",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    cuda_prefill: bool,
    /// Prompt chunks' gate act(gate)·up in one kernel.
    #[arg(long, global = true, help_heading = "CUDA kernels", hide_possible_values = true, env = "LLMC_CUDA_GATE", default_value = "on",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    cuda_gate: bool,
    /// Prompt chunks' RoPE and KV-cache write in one kernel (off: eleven candle ops).
    #[arg(long, global = true, help_heading = "CUDA kernels", hide_possible_values = true, env = "LLMC_CUDA_ROPE", default_value = "on",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    cuda_rope: bool,
    /// Products of 256 rows and more (prompt chunks) on f16 tensor cores, the weight
    /// dequantized to f16 for cuBLAS (off: candle's MMQ on int8 tensor cores).
    #[arg(long, global = true, help_heading = "CUDA kernels", hide_possible_values = true, env = "LLMC_CUDA_GEMM", default_value = "on",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    cuda_gemm: bool,
    /// Decode steps of up to 8 sessions replayed from CUDA graphs, one captured per batch
    /// size (needs the fused step).
    #[arg(long, global = true, help_heading = "CUDA kernels", hide_possible_values = true, env = "LLMC_CUDA_GRAPHS", default_value = "on",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    cuda_graphs: bool,
}

impl From<&CudaArgs> for CudaOptions {
    fn from(a: &CudaArgs) -> Self {
        CudaOptions {
            attention: a.cuda_attention,
            mixed: a.cuda_mixed,
            fused: a.cuda_fused,
            matvec: a.cuda_matvec,
            pdl: a.cuda_pdl,
            prefill: a.cuda_prefill,
            gate: a.cuda_gate,
            rope: a.cuda_rope,
            gemm: a.cuda_gemm,
            graphs: a.cuda_graphs,
        }
    }
}

/// Which model, where, and how it is cut into stages.
#[derive(Args, Debug)]
struct ModelArgs {
    /// GGUF model file.
    #[arg(long)]
    model: PathBuf,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Chain stages split at these layers, e.g. `--split 10,20`.
    #[arg(long, value_delimiter = ',')]
    split: Vec<u32>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text in one process, with the same stage code the cluster runs.
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        /// Prompt text.
        #[arg(long)]
        prompt: String,
        /// Apply the model's chat template to the prompt (as one user message).
        #[arg(long)]
        chat: bool,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Top-k (0: off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Top-p (1: off).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Context bound of the session.
        #[arg(long, default_value_t = 2048)]
        max_ctx: usize,
    },
    /// Serve a slice of a model over tarpc (prints `listening on ADDR` once bound).
    Serve(Box<shard_node::serve_cmd::ServeOptions>),
    /// Compare the CPU with another device, teacher-forced on the CPU's greedy tokens.
    Compare(shard_node::compare_cmd::CompareOptions),
    /// Write a synthetic llama GGUF with random weights (for benchmarks).
    SynthModel(shard_node::synth_cmd::SynthOptions),
    /// Drain a node and take it out of its etcd cluster; waits until it has left.
    Leave(shard_node::leave_cmd::LeaveOptions),
    /// Probe a node: exit 0 when it answers (the container image's HEALTHCHECK).
    ///
    /// Example: shard-node health http://127.0.0.1:9100/metrics   (a node's --metrics-listen)
    ///          shard-node health tcp://127.0.0.1:7070             (its tarpc port accepts)
    Health(common::health::HealthArgs),
    /// Time prompt processing and decode (JSON lines on stdout).
    Bench {
        #[command(flatten)]
        m: ModelArgs,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Decode steps.
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// Repetitions.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// CUDA: stop candle tracking each buffer's uses with CUDA events (a measurement of
        /// what that tracking costs; safe here because the benchmark runs on one thread).
        #[arg(long)]
        no_event_tracking: bool,
        /// Also time batched decode of this many concurrent sessions (continuous batching).
        #[arg(long, default_value_t = 0)]
        batch: usize,
        /// With --batch: also check that batched decode gives each session the tokens it gets
        /// alone (sessions of different prompt lengths), and print the agreement.
        #[arg(long)]
        check_batch: bool,
        /// Prompt tokens a prefill step takes (default: 512 on a GPU, 256 on the CPU).
        #[arg(long)]
        prefill_chunk: Option<usize>,
    },
}

fn main() -> ExitCode {
    match run(common::config_file::parse::<Cli>()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our errors carry their causes in their messages: one line, no backtrace.
            eprintln!("shard-node: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    common::cuda_options::set(CudaOptions::from(&cli.cuda))?;
    match cli.command {
        Command::Generate {
            m,
            prompt,
            chat,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            max_ctx,
        } => generate_cmd::run(&GenerateOptions {
            model: m.model,
            prompt,
            chat,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                seed,
                ..SamplingParams::default()
            },
            stop,
            device: m.device,
            threads: m.threads,
            split: m.split,
            max_ctx,
        }),
        Command::Serve(o) => shard_node::serve_cmd::run(*o),
        Command::Health(h) => Ok(h.run()?),
        Command::Compare(o) => shard_node::compare_cmd::run(o),
        Command::SynthModel(o) => shard_node::synth_cmd::run(o),
        Command::Leave(o) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(shard_node::leave_cmd::run(o)),
        Command::Bench {
            m,
            prompt_tokens,
            gen_tokens,
            runs,
            no_event_tracking,
            batch,
            check_batch,
            prefill_chunk,
        } => bench_cmd::run(&BenchOptions {
            model: m.model,
            prompt_tokens,
            gen_tokens,
            device: m.device,
            threads: m.threads,
            runs,
            split: m.split,
            no_event_tracking,
            batch,
            check_batch,
            prefill_chunk,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    /// `shard-node serve --config FILE ARGS...` as main parses it.
    fn serve(file: &str, args: &[&str]) -> shard_node::serve_cmd::ServeOptions {
        let path = format!("{}/../cluster-configs/{file}", env!("CARGO_MANIFEST_DIR"));
        let mut argv: Vec<OsString> = vec!["shard-node".into(), "serve".into(), "--config".into()];
        argv.push(path.into());
        argv.extend(args.iter().map(OsString::from));
        let cli = common::config_file::try_parse_from::<Cli>(argv)
            .unwrap_or_else(|e| panic!("{file}: {e:?}"));
        match cli.command {
            Command::Serve(o) => *o,
            other => panic!("{other:?}"),
        }
    }

    /// The example files in cluster-configs/ load, and mean what their comments say.
    #[test]
    fn example_configs_load() {
        let a = serve("local/node-a.toml", &[]);
        assert_eq!(a.listen, "127.0.0.1:7071".parse().expect("addr"));
        assert_eq!(a.threads, Some(1));
        assert!(a.join.validate().expect("join").is_none());
        let b = serve("local/node-b.toml", &[]);
        assert_eq!(b.listen.port(), 7072);

        let n = serve(
            "compose/node.toml",
            &["--node-id", "node-a", "--advertise", "node-a:7070"],
        );
        let join = n.join.validate().expect("join").expect("joins etcd");
        assert_eq!(join.etcd.split(',').count(), 3);
        assert_eq!(join.node_id.as_deref(), Some("node-a"));
        assert_eq!(join.ttl_secs, 4);
        assert!(n.tls.tls_ca.is_some());

        // one node per GPU: the file's device and port, overridden per process
        let g = serve(
            "gpu-host.toml",
            &[
                "--device",
                "cuda:1",
                "--listen",
                "0.0.0.0:7071",
                "--node-id",
                "h1-cuda1",
            ],
        );
        assert_eq!(g.device, DeviceSpec::Cuda(1));
        assert_eq!(g.listen.port(), 7071);
        assert_eq!(g.memory_limit, Some(72_000_000_000));
        assert!(g.join.etcd_tls.etcd_ca.is_some() && g.tls.tls_key.is_some());
        let j = g.join.validate().expect("join").expect("joins etcd");
        assert_eq!(j.node_id.as_deref(), Some("h1-cuda1"));
        assert_eq!(serve("gpu-host.toml", &[]).device, DeviceSpec::Cuda(0));
    }
}
