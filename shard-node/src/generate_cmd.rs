//! `shard-node generate`: load the whole model as one chain of stages and generate.

use std::io::Write;
use std::path::PathBuf;

use common::device::{init_threads, DeviceSpec};
use common::generate::{generate, GenerateParams, LocalChain, LocalPipeline};
use common::gguf::GgufFile;
use common::model::LayerRange;
use common::sampling::{Sampler, SamplingParams};
use common::tokenizer::{ChatMessage, TextTokenizer};

/// Options of `generate`.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The GGUF file.
    pub model: PathBuf,
    /// The prompt text.
    pub prompt: String,
    /// Wrap the prompt as one user message in the model's chat template.
    pub chat: bool,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Where to run.
    pub device: DeviceSpec,
    /// CPU threads (default: all cores).
    pub threads: Option<usize>,
    /// Split the model into stages at these layer boundaries (default: one stage).
    pub split: Vec<u32>,
    /// Session context bound.
    pub max_ctx: usize,
}

/// Runs generation, streaming text to stdout and speed to stderr.
pub fn run(o: &GenerateOptions) -> anyhow::Result<()> {
    let threads = init_threads(o.threads)?;
    let device = o.device.open()?;
    let file = GgufFile::open(&o.model)?;
    let cfg = file.config()?;
    let tok = TextTokenizer::from_gguf(&file)?;
    let ranges = LayerRange::from_cuts(&o.split, cfg.n_layers)?;
    let max_ctx = o.max_ctx.min(cfg.context_length);
    let pipe = LocalPipeline::load(&file, &ranges, &device, max_ctx)?;
    let text = if o.chat {
        tok.apply_chat_template(&[ChatMessage::new("user", o.prompt.clone())])?
    } else {
        o.prompt.clone()
    };
    let prompt = tok.encode(&text)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt is empty: give some text with --prompt");
    }
    if prompt.len() + o.max_tokens > max_ctx {
        anyhow::bail!(
            "{} prompt tokens plus --max-tokens {} exceed the context of {max_ctx} tokens: lower --max-tokens or raise --max-ctx",
            prompt.len(),
            o.max_tokens
        );
    }
    let params = GenerateParams {
        max_tokens: o.max_tokens,
        sampling: o.sampling.clone(),
        stop: o.stop.clone(),
        ignore_eos: false,
        cached: 0,
    };
    let mut chain = LocalChain::new(
        &pipe,
        max_ctx,
        Sampler::new(params.sampling.clone())?.with_prompt(&prompt),
    )?;
    let mut out = std::io::stdout().lock();
    let g = futures::executor::block_on(generate(&mut chain, &tok, &prompt, &params, |piece| {
        let _ = out.write_all(piece.text.as_bytes());
        let _ = out.flush();
        std::future::ready(true)
    }))?;
    let _ = writeln!(out);
    let secs = |d: std::time::Duration| d.as_secs_f64().max(1e-9);
    eprintln!(
        "prompt: {} tokens in {:.3}s ({:.1} tok/s); generated: {} tokens in {:.3}s ({:.1} tok/s); finish: {}; device {}, {} threads",
        g.prompt_tokens,
        secs(g.prefill),
        g.prompt_tokens as f64 / secs(g.prefill),
        g.tokens.len(),
        secs(g.decode),
        g.tokens.len().saturating_sub(1) as f64 / secs(g.decode),
        g.finish.map_or("cancelled", |f| f.as_str()),
        o.device,
        threads,
    );
    Ok(())
}
