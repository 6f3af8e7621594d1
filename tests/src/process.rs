//! Real processes on free ports: `shard-node serve`, `coordinator serve`, killed on drop.

use std::path::PathBuf;

/// The workspace's `shard-node` binary, next to the test executable's `deps/` folder.
pub fn shard_node_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let bin = dir.join("shard-node");
    assert!(
        bin.exists(),
        "{} is missing: run through `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// `shard-node leave --etcd ETCD --node ID --drain-timeout SECS`: asks node `id` to leave and
/// waits until it has (the command's own wait).
pub fn shard_node_leave(etcd: &str, id: &str, drain_secs: u64) -> anyhow::Result<()> {
    let out = std::process::Command::new(shard_node_bin())
        .args(["leave", "--etcd", etcd, "--node", id, "--drain-timeout"])
        .arg(drain_secs.to_string())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "shard-node leave: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Waits up to `within` for `child` to exit by itself; its status, if it did.
fn wait_exit(
    child: &mut std::process::Child,
    within: std::time::Duration,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(None)
}

/// A started child, its `listening on` address, and its other `NAME on ADDR` lines.
type Spawned = (std::process::Child, String, Vec<(String, String)>);

/// Starts `cmd` and reads its stdout up to the line `listening on ADDR`; earlier lines of the
/// form `NAME on ADDR` (such as `metrics on ADDR`) are returned too.
fn spawn_listening(mut cmd: std::process::Command) -> anyhow::Result<Spawned> {
    use std::io::BufRead;
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut others = Vec::new();
    loop {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{cmd:?} did not start")
            }
        };
        match line.trim().split_once(" on ") {
            Some(("listening", addr)) => return Ok((child, addr.to_string(), others)),
            Some((name, addr)) => others.push((name.to_string(), addr.to_string())),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{cmd:?} did not start: {line:?}")
            }
        }
    }
}

/// A real `shard-node serve` process on a free port; killed (SIGKILL) on drop.
pub struct ShardProcess {
    child: std::process::Child,
    /// Where it listens.
    pub addr: String,
    /// Where it serves metrics, when started with `--metrics-listen`.
    pub metrics: Option<String>,
}

impl ShardProcess {
    /// Starts a node serving `models_dir` on a free port and waits for its address.
    pub fn spawn(models_dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_at("127.0.0.1:0", models_dir, extra)
    }

    /// [`ShardProcess::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        models_dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start("127.0.0.1:0", models_dir, extra, env)
    }

    /// Starts a node listening on `listen` (to restart one on the address it had).
    pub fn spawn_at(
        listen: &str,
        models_dir: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start(listen, models_dir, extra, &[])
    }

    fn start(
        listen: &str,
        models_dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut cmd = std::process::Command::new(shard_node_bin());
        cmd.envs(env.iter().copied());
        cmd.args([
            "serve",
            "--listen",
            listen,
            "--threads",
            "1",
            "--models-dir",
        ])
        .arg(models_dir)
        .args(extra);
        let (child, addr, others) = spawn_listening(cmd)?;
        let metrics = others
            .into_iter()
            .find(|(name, _)| name == "metrics")
            .map(|(_, a)| a);
        Ok(ShardProcess {
            child,
            addr,
            metrics,
        })
    }

    /// SIGKILL now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ShardProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `within` for the process to exit by itself; its status, if it did.
    pub fn wait_exit(
        &mut self,
        within: std::time::Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        wait_exit(&mut self.child, within)
    }
}

impl Drop for ShardProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The workspace's `coordinator` binary.
pub fn coordinator_bin() -> PathBuf {
    shard_node_bin().with_file_name("coordinator")
}

/// A real `coordinator serve` process on a free HTTP port; killed (SIGKILL) on drop.
pub struct CoordinatorProcess {
    child: std::process::Child,
    /// `http://ADDR`.
    pub url: String,
}

impl CoordinatorProcess {
    /// Starts a coordinator over `nodes` and waits until it serves.
    pub fn spawn(model: &std::path::Path, nodes: &[&ShardProcess]) -> anyhow::Result<Self> {
        let list: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
        Self::spawn_with(model, &["--nodes", &list.join(",")])
    }

    /// Starts a coordinator with `args` after the model (`--nodes ...` or `--etcd ...`) and
    /// waits until it serves HTTP.
    pub fn spawn_with(model: &std::path::Path, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_with_env(model, args, &[])
    }

    /// [`CoordinatorProcess::spawn_with`] with extra environment variables.
    pub fn spawn_with_env(
        model: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut cmd = std::process::Command::new(coordinator_bin());
        cmd.envs(env.iter().copied());
        cmd.args(["serve", "--http", "127.0.0.1:0"]);
        // a context of 1,024 tokens unless `args` asks for another
        if !args.contains(&"--max-ctx") {
            cmd.args(["--max-ctx", "1024"]);
        }
        cmd.arg("--model").arg(model).args(args);
        let (child, addr, _) = spawn_listening(cmd)?;
        Ok(CoordinatorProcess {
            child,
            url: format!("http://{addr}"),
        })
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl CoordinatorProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (what `docker stop` and systemd send).
    pub fn terminate(&self) -> anyhow::Result<()> {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -TERM {} failed", self.child.id());
        Ok(())
    }

    /// Waits up to `within` for the process to exit by itself; its status, if it did.
    pub fn wait_exit(
        &mut self,
        within: std::time::Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        wait_exit(&mut self.child, within)
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The resident set of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
}
