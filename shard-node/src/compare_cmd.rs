//! `shard-node compare`: runs the model on the CPU and on another device in one process,
//! both teacher-forced on the CPU's greedy tokens, and prints one JSON line per step: whether
//! the two argmaxes agree, the CPU's top-2 logit margin there, and the largest logit
//! difference. A disagreement where the margin is small is a near-tie, not a bug.

use common::device::{init_threads, DeviceSpec};
use common::generate::LocalPipeline;
use common::gguf::GgufFile;
use common::model::LayerRange;
use common::sampling::argmax;
use common::tokenizer::TextTokenizer;

/// Options of `compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareOptions {
    /// GGUF model file.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// The device compared with the CPU.
    #[arg(long, default_value = "cuda:0")]
    pub device: DeviceSpec,
    /// Prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Steps.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
}

fn margin(l: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in l {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

/// Prints one JSON line per step, then a summary line.
pub fn run(o: CompareOptions) -> anyhow::Result<()> {
    init_threads(None)?;
    let file = GgufFile::open(&o.model)?;
    let cfg = file.config()?;
    let tok = TextTokenizer::from_gguf(&file)?;
    let ranges = LayerRange::from_cuts(&[], cfg.n_layers)?;
    let max_ctx = 1024.min(cfg.context_length);
    let ids = tok.encode(&o.prompt)?;
    let cpu = LocalPipeline::load(&file, &ranges, &DeviceSpec::Cpu.open()?, max_ctx)?;
    let dev = LocalPipeline::load(&file, &ranges, &o.device.open()?, max_ctx)?;
    let (mut sc, mut sd) = (cpu.session(max_ctx)?, dev.session(max_ctx)?);
    let (mut lc, mut ld) = (cpu.prefill(&mut sc, &ids)?, dev.prefill(&mut sd, &ids)?);
    let (mut agree, mut worst_disagreeing_margin, mut max_diff) = (0, 0f32, 0f32);
    for step in 0..o.max_tokens {
        let (tc, td) = (argmax(&lc), argmax(&ld));
        let diff = lc
            .iter()
            .zip(&ld)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let m = margin(&lc);
        max_diff = max_diff.max(diff);
        if tc == td {
            agree += 1;
        } else {
            worst_disagreeing_margin = worst_disagreeing_margin.max(m);
        }
        println!(
            "{{\"step\":{step},\"cpu\":{tc},\"device\":{td},\"cpu_margin\":{m:.4},\"max_logit_diff\":{diff:.4}}}"
        );
        lc = cpu.decode(&mut sc, tc)?;
        ld = dev.decode(&mut sd, tc)?;
    }
    println!(
        "{{\"summary\":true,\"steps\":{},\"agree\":{agree},\"largest_margin_where_they_disagree\":{worst_disagreeing_margin:.4},\"max_logit_diff\":{max_diff:.4}}}",
        o.max_tokens
    );
    Ok(())
}
