//! `shard-node`: the command line of a shard node.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use common::device::DeviceSpec;
use common::sampling::SamplingParams;
use shard_node::bench_cmd::{self, BenchOptions};
use shard_node::generate_cmd::{self, GenerateOptions};

#[derive(Parser, Debug)]
#[command(name = "shard-node", version, about = "A shard node of the inference cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text in one process, with the same stage code the cluster runs.
    Generate {
        /// GGUF model file.
        #[arg(long)]
        model: PathBuf,
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
        /// cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Chain stages split at these layers, e.g. `--split 10,20`.
        #[arg(long, value_delimiter = ',')]
        split: Vec<u32>,
        /// Context bound of the session.
        #[arg(long, default_value_t = 2048)]
        max_ctx: usize,
    },
    /// Time prompt processing and decode (JSON lines on stdout).
    Bench {
        /// GGUF model file.
        #[arg(long)]
        model: PathBuf,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Decode steps.
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Repetitions.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Chain stages split at these layers, e.g. `--split 15`.
        #[arg(long, value_delimiter = ',')]
        split: Vec<u32>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate {
            model, prompt, chat, max_tokens, temperature, top_k, top_p, seed, stop, device, threads, split, max_ctx,
        } => generate_cmd::run(&GenerateOptions {
            model,
            prompt,
            chat,
            max_tokens,
            sampling: SamplingParams { temperature, top_k, top_p, seed },
            stop,
            device,
            threads,
            split,
            max_ctx,
        }),
        Command::Bench { model, prompt_tokens, gen_tokens, device, threads, runs, split } => {
            bench_cmd::run(&BenchOptions { model, prompt_tokens, gen_tokens, device, threads, runs, split })
        }
    }
}
