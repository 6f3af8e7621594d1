//! Certificates for the TLS tests, written by the real `coordinator certs` commands into a
//! temporary folder: a cluster CA, a coordinator, nodes named `node-a`... (each for
//! 127.0.0.1), and a foreign CA with a coordinator of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::process::coordinator_bin;

/// The folder of certificates; removed when dropped.
#[derive(Debug)]
pub struct ClusterCerts {
    dir: tempfile::TempDir,
}

fn certs(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(coordinator_bin())
        .arg("certs")
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "coordinator certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl ClusterCerts {
    /// A CA, the coordinator `coord`, the nodes `nodes`, and the foreign `intruder`
    /// (a coordinator certificate from another CA).
    pub fn new(nodes: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let p = |s: &str| dir.path().join(s).display().to_string();
        certs(&["init", "--out", &p("ca")])?;
        let issue = |ca: &str, role: &str, name: &str| {
            certs(&[
                "issue",
                "--ca",
                &p(ca),
                "--role",
                role,
                "--name",
                name,
                "--san",
                "127.0.0.1",
                "--out",
                &p("issued"),
            ])
        };
        issue("ca", "coordinator", "coord")?;
        for n in nodes {
            issue("ca", "node", n)?;
        }
        certs(&["init", "--out", &p("other-ca")])?;
        issue("other-ca", "coordinator", "intruder")?;
        Ok(ClusterCerts { dir })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The CA's certificate.
    pub fn ca(&self) -> PathBuf {
        self.path("ca/ca.pem")
    }

    /// `--tls-ca ... --tls-cert ... --tls-key ...` for `name`.
    pub fn flags(&self, name: &str) -> Vec<String> {
        let ca = if name == "intruder" { "other-ca" } else { "ca" };
        vec![
            "--tls-ca".into(),
            self.path(&format!("{ca}/ca.pem")).display().to_string(),
            "--tls-cert".into(),
            self.path(&format!("issued/{name}.pem"))
                .display()
                .to_string(),
            "--tls-key".into(),
            self.path(&format!("issued/{name}-key.pem"))
                .display()
                .to_string(),
        ]
    }

    /// Files for etcd: its server certificate is `name`'s (issued for 127.0.0.1).
    pub fn etcd_files(&self, name: &str) -> crate::EtcdTlsFiles {
        crate::EtcdTlsFiles {
            ca: self.ca(),
            cert: self.path(&format!("issued/{name}.pem")),
            key: self.path(&format!("issued/{name}-key.pem")),
        }
    }

    /// `--etcd-ca ... --etcd-cert ... --etcd-key ...` for `name` as etcd's client.
    pub fn etcd_flags(&self, name: &str) -> Vec<String> {
        let f = self.etcd_files(name);
        [
            ("--etcd-ca", f.ca),
            ("--etcd-cert", f.cert),
            ("--etcd-key", f.key),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v.display().to_string()])
        .collect()
    }

    /// `name`'s identity, loaded as a process loads it.
    pub fn identity(&self, name: &str) -> anyhow::Result<Arc<cluster_tls::Identity>> {
        let f = self.flags(name);
        let files = cluster_tls::TlsFiles {
            ca: Path::new(&f[1]).into(),
            cert: Path::new(&f[3]).into(),
            key: Path::new(&f[5]).into(),
        };
        Ok(Arc::new(cluster_tls::Identity::load(&files)?))
    }

    /// Connects to `addr` as `name` (mutual TLS) and handshakes.
    pub async fn connect(
        &self,
        addr: &str,
        name: &str,
    ) -> anyhow::Result<(proto_types::ShardNodeClient, proto_types::HelloAck)> {
        let d = cluster_tls::Dialer::new(Some(self.identity(name)?));
        Ok(d.connect(addr, name, std::time::Duration::from_secs(5))
            .await?)
    }

    /// `addr`'s status, asked as the coordinator.
    pub async fn status(&self, addr: &str) -> anyhow::Result<proto_types::NodeStatus> {
        let (c, _) = self.connect(addr, "coord").await?;
        let mut ctx = tarpc::context::current();
        ctx.deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        Ok(c.status(ctx).await?)
    }
}

/// One HTTP/1.1 request over TLS to `addr` (`host:port`), trusting `ca`; the status code and
/// the body.
pub async fn https_request(
    addr: &str,
    ca: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = cluster_tls::client_trusting(ca)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string();
    let name = cluster_tls::tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())?;
    let mut tls = cluster_tls::tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("content-length: 0\r\n\r\n");
    tls.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    // the server may close without TLS close_notify once the reply is out
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}
