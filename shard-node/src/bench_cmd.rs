//! `shard-node bench`: prompt and decode speed of the stage runtime, timed the way
//! `scripts/bench_llama_cpp.py` times llama.cpp, for side-by-side figures.

use std::path::PathBuf;
use std::time::Instant;

use common::device::{init_threads, DeviceSpec};
use common::generate::LocalPipeline;
use common::gguf::GgufFile;
use common::model::LayerRange;
use common::sampling::argmax;
use common::tokenizer::TextTokenizer;

/// The text both engines tokenize; its first `prompt_tokens` ids are the prompt.
pub const BENCH_TEXT: &str = "The history of computing is a story of ideas, machines and people. \
From the abacus to mechanical calculators, from punched cards to vacuum tubes, every generation \
built on the last. Transistors replaced tubes, integrated circuits packed thousands and then \
billions of transistors onto a chip, and software grew from hand-written machine code to \
compilers, operating systems, networks and the web. Today, language models run on clusters of \
accelerators, and the engineering questions are about memory, bandwidth and reliability: how \
to split a model across devices, how to move activations quickly, and how to make sure that \
nothing is leaked when a client disappears. This benchmark text is long enough to give a prompt \
of a few hundred tokens, so that prompt processing can be timed on a realistic batch.";

/// Options of `bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The GGUF file.
    pub model: PathBuf,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Decode steps.
    pub gen_tokens: usize,
    /// Where to run.
    pub device: DeviceSpec,
    /// CPU threads.
    pub threads: Option<usize>,
    /// Repetitions (the best is reported, each is printed).
    pub runs: usize,
    /// Layer boundaries for a multi-stage chain.
    pub split: Vec<u32>,
    /// CUDA: turn off candle's per-buffer event tracking.
    pub no_event_tracking: bool,
    /// Also time batched decode of this many sessions at once (0: don't).
    pub batch: usize,
    /// With `batch`: check batched tokens against each session decoded alone.
    pub check_batch: bool,
    /// Prompt tokens a prefill step takes (`None`: the pipeline's default).
    pub prefill_chunk: Option<usize>,
}

/// Runs the benchmark and prints one JSON line per run to stdout.
pub fn run(o: &BenchOptions) -> anyhow::Result<()> {
    let threads = init_threads(o.threads)?;
    let device = o.device.open()?;
    if o.no_event_tracking {
        #[allow(unsafe_code)]
        // SAFETY: the benchmark loads, runs and frees everything on this one thread, so on
        // one stream; nothing needs cross-stream ordering.
        unsafe {
            common::device::disable_event_tracking(&device);
        }
    }
    // As a node does before it loads anything: every kind of kernel once (cuBLAS's f16
    // product included), candle's workspaces at their largest.
    common::warmup::warm_up(&device)?;
    let file = GgufFile::open(&o.model)?;
    let cfg = file.config()?;
    let tok = TextTokenizer::from_gguf(&file)?;
    let mut ids = tok.encode(BENCH_TEXT)?;
    while ids.len() < o.prompt_tokens {
        ids.extend(tok.encode(BENCH_TEXT)?);
    }
    ids.truncate(o.prompt_tokens);
    let ranges = LayerRange::from_cuts(&o.split, cfg.n_layers)?;
    let max_ctx = (o.prompt_tokens + o.gen_tokens + 1).min(cfg.context_length);
    let mut pipe = LocalPipeline::load(&file, &ranges, &device, max_ctx)?;
    if let Some(c) = o.prefill_chunk {
        anyhow::ensure!(c > 0, "--prefill-chunk must be at least 1 token");
        pipe = pipe.with_prefill_chunk(c);
    }
    // Warm-up: one short pass, as llama.cpp's own first eval pays page faults too.
    {
        let mut s = pipe.session(max_ctx)?;
        let l = pipe.prefill(&mut s, &ids[..ids.len().min(16)])?;
        pipe.decode(&mut s, argmax(&l))?;
    }
    for run in 0..o.runs {
        let mut s = pipe.session(max_ctx)?;
        let t0 = Instant::now();
        let mut next = argmax(&pipe.prefill(&mut s, &ids)?);
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        // Greedy picks, made on the GPU there (as a node makes them for greedy sessions).
        for _ in 0..o.gen_tokens {
            next = pipe.decode_greedy(&mut s, next)?;
        }
        let decode = t1.elapsed().as_secs_f64();
        println!(
            "{{\"engine\":\"shard-node\",\"run\":{run},\"threads\":{threads},\"stages\":{},\"prompt_tokens\":{},\"prefill_chunk\":{},\"prompt_tok_s\":{:.2},\"gen_tokens\":{},\"decode_tok_s\":{:.2}}}",
            ranges.len(),
            ids.len(),
            pipe.prefill_chunk(),
            ids.len() as f64 / prefill,
            o.gen_tokens,
            o.gen_tokens as f64 / decode
        );
    }
    if o.batch > 0 {
        bench_batch(&pipe, &ids, o, max_ctx, threads)?;
        if o.check_batch {
            check_batch(&pipe, &ids, o, max_ctx)?;
        }
    }
    Ok(())
}

/// Greedy decode of `o.batch` sessions, session `i` prompted with the first `4 + i` prompt
/// tokens (so every step mixes positions), once batched and once each alone; prints how many
/// sessions got the same tokens and, for the others, the first step that differs. On a GPU
/// the batched products may round differently from single-row ones, so a near-tie can flip
/// late in a sequence; a wrong kernel differs from the first steps on.
fn check_batch(
    pipe: &LocalPipeline,
    ids: &[u32],
    o: &BenchOptions,
    max_ctx: usize,
) -> anyhow::Result<()> {
    let steps = o.gen_tokens.min(32);
    let prompts: Vec<&[u32]> = (0..o.batch)
        .map(|i| &ids[..(4 + i).min(ids.len())])
        .collect();
    if prompts.iter().any(|p| p.len() + steps + 1 > max_ctx) {
        anyhow::bail!(
            "--check-batch: prompts of up to {} tokens plus {steps} steps do not fit in a \
             context of {max_ctx}; use a larger --prompt-tokens or --gen-tokens",
            4 + o.batch
        );
    }
    let mut sessions = Vec::with_capacity(o.batch);
    let mut next = Vec::with_capacity(o.batch);
    for p in &prompts {
        let mut s = pipe.session(max_ctx)?;
        next.push(argmax(&pipe.prefill(&mut s, p)?));
        sessions.push(s);
    }
    let mut batched: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
    for _ in 1..steps {
        let mut refs: Vec<&mut _> = sessions.iter_mut().collect();
        let logits = pipe.decode_batch(&mut refs, &next)?.to_vec2::<f32>()?;
        for ((t, row), seq) in next.iter_mut().zip(&logits).zip(&mut batched) {
            *t = argmax(row);
            seq.push(*t);
        }
    }
    let mut same = 0;
    let mut diverge = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut s = pipe.session(max_ctx)?;
        let mut t = argmax(&pipe.prefill(&mut s, p)?);
        let mut alone = vec![t];
        for _ in 1..steps {
            t = argmax(&pipe.decode(&mut s, t)?);
            alone.push(t);
        }
        match alone.iter().zip(&batched[i]).position(|(a, b)| a != b) {
            None => same += 1,
            Some(step) => diverge.push(format!("{{\"session\":{i},\"step\":{step}}}")),
        }
    }
    println!(
        "{{\"check\":\"batch\",\"sessions\":{},\"steps\":{steps},\"identical\":{same},\"diverged\":[{}]}}",
        o.batch,
        diverge.join(",")
    );
    Ok(())
}

/// Batched decode, as a node runs it under concurrent streams: `o.batch` sessions, each
/// prefilled with the first 16 prompt tokens, then `o.gen_tokens` steps of one forward pass
/// over all of them. Aggregate tok/s counts every session's token.
fn bench_batch(
    pipe: &LocalPipeline,
    ids: &[u32],
    o: &BenchOptions,
    max_ctx: usize,
    threads: usize,
) -> anyhow::Result<()> {
    let prompt = &ids[..ids.len().min(16)];
    for run in 0..o.runs {
        let mut sessions = Vec::with_capacity(o.batch);
        let mut next = Vec::with_capacity(o.batch);
        for _ in 0..o.batch {
            let mut s = pipe.session(max_ctx)?;
            next.push(argmax(&pipe.prefill(&mut s, prompt)?));
            sessions.push(s);
        }
        let steps = o.gen_tokens.min(max_ctx.saturating_sub(prompt.len() + 1));
        let t = Instant::now();
        for _ in 0..steps {
            let mut refs: Vec<&mut _> = sessions.iter_mut().collect();
            next = pipe.decode_batch_greedy(&mut refs, &next)?;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{{\"engine\":\"shard-node\",\"run\":{run},\"threads\":{threads},\"batch\":{},\"steps\":{steps},\"aggregate_tok_s\":{:.2},\"step_ms\":{:.2}}}",
            o.batch,
            (steps * o.batch) as f64 / secs,
            secs * 1e3 / steps as f64
        );
    }
    Ok(())
}
