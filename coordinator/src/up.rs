//! `coordinator up`: a local cluster in one command. It fetches the default model if
//! missing, starts N `shard-node serve` processes on free ports, and returns their
//! addresses; the processes die with the returned guard (and on ctrl-c with the coordinator).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{CoordError, Result};

/// The default model's file name.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Started shard nodes; killed on drop.
#[derive(Debug)]
pub struct LocalNodes {
    children: Vec<Child>,
    /// Their addresses, first stage first.
    pub addrs: Vec<String>,
}

impl Drop for LocalNodes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Returns `model`, or the default model under `models/`, fetching it with
/// `scripts/fetch-model.sh` when missing.
pub fn ensure_model(model: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m);
    }
    let path = Path::new("models").join(DEFAULT_MODEL);
    if path.exists() {
        return Ok(path);
    }
    let script = Path::new("scripts/fetch-model.sh");
    if !script.exists() {
        return Err(CoordError::BadRequest(format!(
            "{} is missing and scripts/fetch-model.sh is not here: run from the repository root or pass --model",
            path.display()
        )));
    }
    let status = Command::new("bash")
        .arg(script)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() || !path.exists() {
        return Err(CoordError::BadRequest(
            "scripts/fetch-model.sh could not fetch the default model".into(),
        ));
    }
    Ok(path)
}

/// Starts `n` shard nodes serving `models_dir`, with `threads` kernel threads each.
pub fn start_nodes(n: usize, models_dir: &Path, threads: usize) -> Result<LocalNodes> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("shard-node");
    if !bin.exists() {
        return Err(CoordError::BadRequest(format!(
            "{} is missing: build the workspace first",
            bin.display()
        )));
    }
    let mut nodes = LocalNodes {
        children: Vec::new(),
        addrs: Vec::new(),
    };
    for _ in 0..n {
        let mut child = Command::new(&bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--threads",
                &threads.to_string(),
                // Ends with this process, even on SIGKILL, when no Drop runs.
                "--parent-pid",
                &std::process::id().to_string(),
                "--models-dir",
            ])
            .arg(models_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = child.stdout.take();
        nodes.children.push(child);
        let mut line = String::new();
        if let Some(out) = out {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        let addr = line.trim().strip_prefix("listening on ").ok_or_else(|| {
            CoordError::BadRequest(format!("a shard node did not start: {line:?}"))
        })?;
        nodes.addrs.push(addr.to_string());
    }
    Ok(nodes)
}
