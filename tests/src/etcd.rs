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
        let dir = tempfile::tempdir()?;
        let (client, peer, metrics) = (free_port()?, free_port()?, free_port()?);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let health = format!("http://127.0.0.1:{metrics}");
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
            health,
            _dir: dir,
        };
        let start = std::time::Instant::now();
        loop {
            let health = crate::http::get(&format!("{}/health", etcd.health));
            if health.is_ok_and(|(_, body)| body.contains("true")) {
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
