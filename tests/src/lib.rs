//! Helpers shared by the cross-process and model tests.

use std::path::PathBuf;

pub use common::testing::{default_model, workspace_root};

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

    /// Starts a node listening on `listen` (to restart one on the address it had).
    pub fn spawn_at(
        listen: &str,
        models_dir: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = std::process::Command::new(shard_node_bin());
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
    /// Waits up to `within` for the process to exit by itself; its status, if it did.
    pub fn wait_exit(
        &mut self,
        within: std::time::Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let start = std::time::Instant::now();
        while start.elapsed() < within {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(None)
    }
}

impl Drop for ShardProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects and handshakes as a test client.
pub async fn connect(
    addr: &str,
) -> anyhow::Result<(proto_types::ShardNodeClient, proto_types::HelloAck)> {
    Ok(proto_types::connect(addr, "test", std::time::Duration::from_secs(5)).await?)
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
        let mut cmd = std::process::Command::new(coordinator_bin());
        cmd.args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--max-ctx",
            "1024",
            "--model",
        ])
        .arg(model)
        .args(args);
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

/// etcd exited before it was healthy: its status and the end of its log.
struct Early(String);

/// A real etcd server (Debian's `etcd-server`) on free ports with a temporary data directory;
/// killed on drop.
pub struct EtcdProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl EtcdProcess {
    /// Starts etcd and waits until it is healthy. Its ports are found free and released
    /// before etcd binds them, so another test's process may take one in between: etcd then
    /// exits at once, and it is started again on fresh ports (up to 3 tries).
    pub fn start() -> anyhow::Result<Self> {
        for _ in 0..2 {
            match Self::spawn_and_wait()? {
                Ok(etcd) => return Ok(etcd),
                Err(Early(status)) => {
                    eprintln!("etcd exited at start ({status}), probably a port taken: retrying")
                }
            }
        }
        match Self::spawn_and_wait()? {
            Ok(etcd) => Ok(etcd),
            Err(Early(status)) => anyhow::bail!("etcd exited: {status}"),
        }
    }

    /// One try: `Ok(Err(_))` when etcd exited before it was healthy.
    fn spawn_and_wait() -> anyhow::Result<std::result::Result<Self, Early>> {
        let dir = tempfile::tempdir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("test={peer_url}"),
                "--log-level",
                "error",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("etcd.err"))?)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting etcd (apt-get install etcd-server): {e}"))?;
        let mut etcd = EtcdProcess {
            child,
            url,
            _dir: dir,
        };
        let start = std::time::Instant::now();
        loop {
            let out = std::process::Command::new("curl")
                .args(["-s", "-m", "1", &format!("{}/health", etcd.url)])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).contains("true") {
                return Ok(Ok(etcd));
            }
            if let Some(status) = etcd.child.try_wait()? {
                let log =
                    std::fs::read_to_string(etcd._dir.path().join("etcd.err")).unwrap_or_default();
                let tail: String = log.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                return Ok(Err(Early(format!("{status}: {tail}"))));
            }
            anyhow::ensure!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "etcd did not become healthy"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// A registry client for cluster `cluster`.
    pub async fn registry(&self, cluster: &str) -> anyhow::Result<cluster_registry::Registry> {
        Ok(cluster_registry::Registry::connect(&self.url, cluster).await?)
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        let start = std::time::Instant::now();
        while start.elapsed() < within {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(None)
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` a JSON body to `url`; returns (status, body). `-N` streams.
pub fn curl_post(url: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let out = std::process::Command::new("curl")
        .args([
            "-sN",
            "-m",
            "120",
            "-H",
            "content-type: application/json",
            "-w",
            "\n%{http_code}",
            "-d",
            body,
            url,
        ])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text
        .rsplit_once('\n')
        .ok_or_else(|| anyhow::anyhow!("no status from curl"))?;
    Ok((code.trim().parse()?, body.to_string()))
}

/// The text of an OpenAI SSE stream: `data:` chunks concatenated until `[DONE]`; errors if
/// the stream carried an error event or never finished.
pub fn sse_text(body: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    let mut done = false;
    for line in body.lines() {
        if line.starts_with("event: error") {
            anyhow::bail!("error event: {body}");
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        let c = &v["choices"][0];
        if let Some(t) = c["text"].as_str().or(c["delta"]["content"].as_str()) {
            text.push_str(t);
        }
    }
    anyhow::ensure!(done, "stream did not end with [DONE]: {body}");
    Ok(text)
}

/// A node's status, over a fresh connection (whose lease goes when it closes).
pub async fn node_status(addr: &str) -> anyhow::Result<proto_types::NodeStatus> {
    let (c, _) = connect(addr).await?;
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    Ok(c.status(ctx).await?)
}

/// KV cache bytes over every lease of a status.
pub fn kv_bytes(s: &proto_types::NodeStatus) -> u64 {
    s.leases.iter().map(|l| l.kv_cache).sum()
}

/// Polls `addr`'s status until `done` holds, for at most `within`; returns the last status
/// and how long it took, or fails with the last status.
pub async fn wait_status(
    addr: &str,
    within: std::time::Duration,
    done: impl Fn(&proto_types::NodeStatus) -> bool,
) -> anyhow::Result<(proto_types::NodeStatus, std::time::Duration)> {
    let start = std::time::Instant::now();
    loop {
        let s = node_status(addr).await?;
        if done(&s) {
            return Ok((s, start.elapsed()));
        }
        anyhow::ensure!(
            start.elapsed() < within,
            "{addr}: not reached within {within:?}: {s:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `curl` a streamed completion in the background (a child process to kill or let time out).
pub fn curl_stream(
    url: &str,
    max_tokens: u32,
    max_secs: f32,
) -> std::io::Result<std::process::Child> {
    let body = format!(
        r#"{{"prompt":"Count slowly: 1, 2, 3,","max_tokens":{max_tokens},"temperature":0,"stream":true,"ignore_eos":true}}"#
    );
    std::process::Command::new("curl")
        .args([
            "-sN",
            "-m",
            &max_secs.to_string(),
            "-H",
            "content-type: application/json",
            "-d",
        ])
        .arg(body)
        .arg(format!("{url}/v1/completions"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
}

/// Renews `lease` every 400 ms until a heartbeat fails (tests whose work outlasts a short
/// TTL). It holds a clone of `client`, so the connection stays open while it runs.
pub fn keep_alive(client: proto_types::ShardNodeClient, lease: proto_types::LeaseId) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            let mut ctx = tarpc::context::current();
            ctx.deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            match client.heartbeat(ctx, lease).await {
                Ok(Ok(_)) => {}
                other => {
                    eprintln!("keep_alive of {lease}: {other:?}");
                    return;
                }
            }
        }
    });
}

/// Greedy output of single-process `shard-node generate`.
pub fn generate(model: &std::path::Path, prompt: &str, n: u32) -> anyhow::Result<String> {
    let out = std::process::Command::new(shard_node_bin())
        .args([
            "generate",
            "--threads",
            "1",
            "--max-tokens",
            &n.to_string(),
            "--prompt",
            prompt,
            "--model",
        ])
        .arg(model)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_string())
}

/// A greedy completion through the coordinator at `url`: its text (streamed or not).
pub fn completion(url: &str, prompt: &str, n: u32, stream: bool) -> anyhow::Result<String> {
    completion_with(
        url,
        serde_json::json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}),
    )
}

/// A completion with the request `body`: its text (streamed or not).
pub fn completion_with(url: &str, body: serde_json::Value) -> anyhow::Result<String> {
    let stream = body["stream"].as_bool().unwrap_or(false);
    let (code, text) = curl_post(&format!("{url}/v1/completions"), &body.to_string())?;
    anyhow::ensure!(code == 200, "status {code}: {text}");
    if stream {
        sse_text(&text)
    } else {
        let v: serde_json::Value = serde_json::from_str(&text)?;
        anyhow::ensure!(
            v["usage"]["completion_tokens"].as_u64().is_some(),
            "no usage: {text}"
        );
        Ok(v["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

/// `GET url` as JSON.
pub fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new("curl")
        .args(["-s", "-m", "10", url])
        .output()?;
    Ok(serde_json::from_slice(&out.stdout)?)
}
