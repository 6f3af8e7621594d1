//! The TLS flags both binaries take.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::Result;
use crate::files::{Identity, TlsFiles};

/// `--tls-ca`, `--tls-cert`, `--tls-key`: all three turn mutual TLS on for every tarpc link
/// this process makes or accepts; none leaves it off.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// The cluster CA's certificate (PEM): peers must present certificates it signed.
    #[arg(long, env = "LLMC_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), signed by the CA, its role in the subject's OU
    /// (`coordinator certs issue` writes one).
    #[arg(long, env = "LLMC_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "LLMC_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The files named, or `None` when TLS is off.
    pub fn files(&self) -> Result<Option<TlsFiles>> {
        TlsFiles::from_flags(
            self.tls_ca.clone(),
            self.tls_cert.clone(),
            self.tls_key.clone(),
        )
    }

    /// Loads the identity, or `None` when TLS is off.
    pub fn load(&self) -> Result<Option<Arc<Identity>>> {
        self.files()?
            .map(|f| Identity::load(&f).map(Arc::new))
            .transpose()
    }
}
