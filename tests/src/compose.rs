//! Docker Compose projects of the cluster's images, for the tests that need several hosts:
//! each container has its own address on the project's network, and can be killed, cut off
//! and reconnected. A [`Compose`] is its own project (a unique name), torn down with its
//! volumes when dropped, however the test ends; every command it runs is bounded in time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::workspace_root;

/// `docker compose` (the plugin) where it exists, else `docker-compose`.
fn compose_program() -> &'static [&'static str] {
    static PROGRAM: OnceLock<&'static [&'static str]> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let plugin = Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if plugin {
            &["docker", "compose"]
        } else {
            &["docker-compose"]
        }
    })
}

/// Runs `cmd`, killing it after `within`; its output, or an error with its stderr.
fn run(mut cmd: Command, within: Duration) -> anyhow::Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "{what}: still running after {within:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Builds the images once per test run, from the binaries next to the test executable
/// (`scripts/build-images.sh --bin-dir`; the base image is made the first time).
pub fn build_images() -> anyhow::Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let bins = crate::shard_node_bin()
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            let mut cmd = Command::new(workspace_root().join("scripts/build-images.sh"));
            cmd.arg("--bin-dir").arg(bins);
            run(cmd, Duration::from_secs(900))
                .map(|_| ())
                .map_err(|e| format!("building the images: {e}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The OTLP receiver (`otlp-sink --print`) as the image `llm-cluster/otlp-sink`, standing in
/// for Jaeger (tests/fixtures/otlp-sink.Dockerfile); built once per run.
pub fn build_sink_image() -> anyhow::Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let built = (|| {
                let bin = crate::shard_node_bin().with_file_name("otlp-sink");
                anyhow::ensure!(bin.exists(), "{} is missing", bin.display());
                let ctx = tempfile::tempdir()?;
                std::fs::copy(&bin, ctx.path().join("otlp-sink"))?;
                let mut cmd = Command::new("docker");
                cmd.args(["build", "-q", "-t", "llm-cluster/otlp-sink:latest", "-f"])
                    .arg(workspace_root().join("tests/fixtures/otlp-sink.Dockerfile"))
                    .arg(ctx.path());
                run(cmd, Duration::from_secs(300)).map(|_| ())
            })();
            built.map_err(|e| format!("building the otlp-sink image: {e}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A running compose project.
pub struct Compose {
    project: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    profiles: Vec<String>,
}

impl Compose {
    /// A project of `files` (relative to the workspace root) with `env` for their
    /// variables; nothing runs until [`Compose::up`]. The model folder is the workspace's.
    pub fn new(name: &str, files: &[&str], env: &[(&str, &str)]) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut all = vec![(
            "MODELS_DIR".to_string(),
            crate::models_dir().display().to_string(),
        )];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Compose {
            project: format!("llmt{}{name}{n}", std::process::id()),
            files: files.iter().map(|f| workspace_root().join(f)).collect(),
            env: all,
            profiles: Vec::new(),
        }
    }

    /// Turns a profile on (e.g. `tracing`).
    pub fn profile(mut self, p: &str) -> Self {
        self.profiles.push(p.to_string());
        self
    }

    /// The project's name.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// `docker compose -p PROJECT -f FILE... ARGS`.
    pub fn command(&self, args: &[&str]) -> Command {
        let prog = compose_program();
        let mut cmd = Command::new(prog[0]);
        cmd.args(&prog[1..]).args(["-p", &self.project]);
        for f in &self.files {
            cmd.arg("-f").arg(f);
        }
        for p in &self.profiles {
            cmd.args(["--profile", p]);
        }
        cmd.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs a compose command; its stdout.
    pub fn compose(&self, args: &[&str], within: Duration) -> anyhow::Result<String> {
        let out = run(self.command(args), within)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `up -d` for `services` (all when empty).
    pub fn up(&self, services: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["up", "-d"];
        args.extend(services);
        self.compose(&args, Duration::from_secs(180)).map(|_| ())
    }

    /// The container id of `service`.
    pub fn container(&self, service: &str) -> anyhow::Result<String> {
        let id = self.compose(&["ps", "-q", service], Duration::from_secs(30))?;
        let id = id.trim();
        anyhow::ensure!(!id.is_empty(), "no container for {service}");
        Ok(id.to_string())
    }

    /// `docker ARGS` (bounded).
    pub fn docker(args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("docker");
        cmd.args(args);
        let out = run(cmd, Duration::from_secs(60))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The project's default network.
    pub fn network(&self) -> String {
        format!("{}_default", self.project)
    }

    /// `service`'s address on the project's network (reachable from this host).
    pub fn ip(&self, service: &str) -> anyhow::Result<String> {
        let id = self.container(service)?;
        let fmt = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network()
        );
        let ip = Self::docker(&["inspect", "-f", &fmt, &id])?;
        let ip = ip.trim().to_string();
        anyhow::ensure!(!ip.is_empty(), "{service} has no address");
        Ok(ip)
    }

    /// `docker kill` (SIGKILL, no shutdown).
    pub fn kill(&self, service: &str) -> anyhow::Result<()> {
        Self::docker(&["kill", &self.container(service)?]).map(|_| ())
    }

    /// Cuts `service` off the project's network.
    pub fn disconnect(&self, service: &str) -> anyhow::Result<()> {
        let id = self.container(service)?;
        Self::docker(&["network", "disconnect", &self.network(), &id]).map(|_| ())
    }

    /// Puts `service` back on the network under its name.
    pub fn reconnect(&self, service: &str) -> anyhow::Result<()> {
        let id = self.container(service)?;
        Self::docker(&[
            "network",
            "connect",
            "--alias",
            service,
            &self.network(),
            &id,
        ])
        .map(|_| ())
    }

    /// The last lines of `service`'s log, for failure messages.
    pub fn logs(&self, service: &str) -> String {
        self.compose(
            &["logs", "--no-color", "--tail", "80", service],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| e.to_string())
    }

    /// `http://IP:PORT` of `service`.
    pub fn url(&self, service: &str, port: u16) -> anyhow::Result<String> {
        Ok(format!("http://{}:{port}", self.ip(service)?))
    }
}

impl Drop for Compose {
    /// Tears the project down with its volumes, however the test ended.
    fn drop(&mut self) {
        let _ = self.compose(
            &["down", "-v", "--remove-orphans", "-t", "2"],
            Duration::from_secs(120),
        );
    }
}

/// Polls `f` every 250 ms until it succeeds or `within` passes; the last error then.
pub fn eventually<T>(
    within: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > within => {
                return Err(e.context(format!("still failing after {within:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// What a node's `/metrics` says it holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Held {
    /// Plan epoch served (0: none).
    pub epoch: u64,
    /// Open sessions.
    pub sessions: u64,
    /// Leases holding committed weights.
    pub weight_leases: usize,
    /// Bytes of prepared (uncommitted) slices.
    pub prepared: u64,
    /// Bytes of KV caches and activations.
    pub transient: u64,
}

/// Reads a node's `/metrics` at `url` (`http://IP:9100`).
pub fn held(url: &str) -> anyhow::Result<Held> {
    let (code, text) = crate::get(&format!("{url}/metrics"))?;
    anyhow::ensure!(code == 200, "metrics: {code}");
    let mut h = Held {
        epoch: crate::metric(&text, "shard_plan_epoch")? as u64,
        sessions: crate::metric(&text, "shard_sessions")? as u64,
        ..Held::default()
    };
    for line in text.lines().filter(|l| l.starts_with("shard_lease_bytes{")) {
        let v: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_default() as u64;
        if line.contains("kind=\"weights\"") && v > 0 {
            h.weight_leases += 1;
        } else if line.contains("kind=\"prepared\"") {
            h.prepared += v;
        } else if line.contains("kind=\"kv_cache\"") || line.contains("kind=\"activations\"") {
            h.transient += v;
        }
    }
    Ok(h)
}
