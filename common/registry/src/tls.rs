//! etcd over TLS with a client certificate: `--etcd-ca`, `--etcd-cert`, `--etcd-key`, set once
//! at start-up for every connection the process makes to etcd.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::error::{RegistryError, Result};

/// The flags, on every command that talks to etcd.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdTlsArgs {
    /// The CA certificate (PEM) that signed etcd's server certificate; with `--etcd-cert`
    /// and `--etcd-key`, etcd is reached over TLS (use `https://` endpoints).
    #[arg(long, env = "LLMC_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// This process's client certificate for etcd (PEM).
    #[arg(long, env = "LLMC_ETCD_CERT", value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "LLMC_ETCD_KEY", value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
}

/// The loaded PEM files.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

static TLS: OnceLock<EtcdTls> = OnceLock::new();

impl EtcdTlsArgs {
    /// Reads the files and uses them for every etcd connection from now on; nothing when no
    /// flag is given. One or two of the three is an error naming the missing ones.
    pub fn install(&self) -> Result<()> {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| RegistryError::Invalid(format!("etcd TLS file {}: {e}", p.display())))
        };
        match (&self.etcd_ca, &self.etcd_cert, &self.etcd_key) {
            (None, None, None) => Ok(()),
            (Some(ca), Some(cert), Some(key)) => {
                let tls = EtcdTls {
                    ca: read(ca)?,
                    cert: read(cert)?,
                    key: read(key)?,
                };
                TLS.set(tls)
                    .map_err(|_| RegistryError::Invalid("etcd TLS is set already".into()))
            }
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    ("--etcd-ca", ca.is_none()),
                    ("--etcd-cert", cert.is_none()),
                    ("--etcd-key", key.is_none()),
                ]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(f, _)| *f)
                .collect();
                Err(RegistryError::Invalid(format!(
                    "etcd TLS needs --etcd-ca, --etcd-cert and --etcd-key together; missing {}",
                    missing.join(", ")
                )))
            }
        }
    }
}

/// The TLS options for etcd-client, when installed.
pub(crate) fn options() -> Option<etcd_client::TlsOptions> {
    TLS.get().map(|t| {
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&t.ca))
            .identity(etcd_client::Identity::from_pem(&t.cert, &t.key))
    })
}
