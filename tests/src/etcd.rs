//! A real etcd server for the membership and 2PC tests.

use crate::process::free_port;

/// etcd exited before it was healthy: its status and the end of its log.
struct Early(String);

/// A real etcd server (Debian's `etcd-server`) on free ports with a temporary data directory;
/// killed on drop.
pub struct EtcdProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub url: String,
    /// Where its `/health` is served (plain HTTP, also with TLS).
    health: String,
    _dir: tempfile::TempDir,
}

/// etcd's server certificate, key and the CA its clients' certificates must chain to.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    /// The CA (PEM).
    pub ca: std::path::PathBuf,
    /// The server's certificate (PEM), naming 127.0.0.1.
    pub cert: std::path::PathBuf,
    /// Its key (PEM).
    pub key: std::path::PathBuf,
}

impl EtcdProcess {
    /// Starts etcd and waits until it is healthy. Its ports are found free and released
    /// before etcd binds them, so another test's process may take one in between: etcd then
    /// exits at once, and it is started again on fresh ports (up to 3 tries).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// [`EtcdProcess::start`] serving clients over TLS only, with client certificates
    /// required (`--client-cert-auth`).
    pub fn start_tls(tls: &EtcdTlsFiles) -> anyhow::Result<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&EtcdTlsFiles>) -> anyhow::Result<Self> {
        for _ in 0..2 {
            match Self::spawn_and_wait(tls)? {
                Ok(etcd) => return Ok(etcd),
                Err(Early(status)) => {
                    eprintln!("etcd exited at start ({status}), probably a port taken: retrying")
                }
            }
        }
        match Self::spawn_and_wait(tls)? {
            Ok(etcd) => Ok(etcd),
            Err(Early(status)) => anyhow::bail!("etcd exited: {status}"),
        }
    }

    /// One try: `Ok(Err(_))` when etcd exited before it was healthy.
    fn spawn_and_wait(
        tls: Option<&EtcdTlsFiles>,
    ) -> anyhow::Result<std::result::Result<Self, Early>> {
        let ports = Ports::free()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let cluster = format!("test={}", ports.peer_url());
        let mut etcd = Self::spawn("test", &ports, scheme, &cluster, tls)?;
        Ok(etcd.wait_healthy()?.map(|()| etcd))
    }

    /// Starts member `name` of the cluster `initial` (`name=peer-url,...`) on `ports`.
    fn spawn(
        name: &str,
        ports: &Ports,
        scheme: &str,
        initial: &str,
        tls: Option<&EtcdTlsFiles>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let url = format!("{scheme}://127.0.0.1:{}", ports.client);
        let peer_url = ports.peer_url();
        let health = format!("http://127.0.0.1:{}", ports.metrics);
        let mut cmd = std::process::Command::new("etcd");
        if let Some(t) = tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--listen-metrics-urls", &health])
            .args(["--name", name, "--data-dir"])
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
                initial,
                "--log-level",
                "error",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("etcd.err"))?)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting etcd (apt-get install etcd-server): {e}"))?;
        Ok(EtcdProcess {
            child,
            url,
            health,
            _dir: dir,
        })
    }

    /// Waits until it is healthy: `Ok(Err(_))` when it exited first.
    fn wait_healthy(&mut self) -> anyhow::Result<std::result::Result<(), Early>> {
        let start = std::time::Instant::now();
        loop {
            let health = crate::http::get(&format!("{}/health", self.health));
            if health.is_ok_and(|(_, body)| body.contains("true")) {
                return Ok(Ok(()));
            }
            if let Some(status) = self.child.try_wait()? {
                let log =
                    std::fs::read_to_string(self._dir.path().join("etcd.err")).unwrap_or_default();
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

    /// Stops the server (SIGSTOP) without closing its connections: an etcd that answers
    /// nothing, as in an outage.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let st = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(st.success(), "kill {sig} etcd: {st}");
        Ok(())
    }

    /// A registry client for cluster `cluster`.
    pub async fn registry(&self, cluster: &str) -> anyhow::Result<cluster_registry::Registry> {
        Ok(cluster_registry::Registry::connect(&self.url, cluster).await?)
    }
}

/// A member's ports, found free (and released before etcd binds them).
struct Ports {
    client: u16,
    peer: u16,
    metrics: u16,
}

impl Ports {
    fn free() -> anyhow::Result<Self> {
        Ok(Ports {
            client: free_port()?,
            peer: free_port()?,
            metrics: free_port()?,
        })
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer)
    }
}

/// A real etcd cluster of several members on loopback, each killed on drop.
pub struct EtcdCluster {
    /// Its members, `None` once killed.
    members: Vec<Option<EtcdProcess>>,
    urls: Vec<String>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until each is healthy (the whole cluster is started
    /// again on fresh ports, up to 3 tries, when a member exits at start).
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let mut last = String::new();
        for _ in 0..3 {
            let ports: Vec<Ports> = (0..n)
                .map(|_| Ports::free())
                .collect::<anyhow::Result<_>>()?;
            let initial: Vec<String> = ports
                .iter()
                .enumerate()
                .map(|(i, p)| format!("m{i}={}", p.peer_url()))
                .collect();
            let initial = initial.join(",");
            let mut members = Vec::with_capacity(n);
            for (i, p) in ports.iter().enumerate() {
                members.push(EtcdProcess::spawn(
                    &format!("m{i}"),
                    p,
                    "http",
                    &initial,
                    None,
                )?);
            }
            let mut early = None;
            for m in &mut members {
                if let Err(Early(status)) = m.wait_healthy()? {
                    early = Some(status);
                    break;
                }
            }
            match early {
                None => {
                    let urls = members.iter().map(|m| m.url.clone()).collect();
                    return Ok(EtcdCluster {
                        members: members.into_iter().map(Some).collect(),
                        urls,
                    });
                }
                Some(status) => {
                    eprintln!("an etcd member exited at start ({status}), probably a port taken: retrying");
                    last = status;
                }
            }
        }
        anyhow::bail!("etcd cluster: a member exited at start: {last}")
    }

    /// Every member's client URL, comma-separated, in member order.
    pub fn urls(&self) -> String {
        self.urls.join(",")
    }

    /// Member `i`'s client URL.
    pub fn url(&self, i: usize) -> &str {
        &self.urls[i]
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.members[i] = None;
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
