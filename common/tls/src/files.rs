//! The PEM files of a process's TLS identity, loaded into rustls configurations.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::{Result, TlsError};
use crate::role::Role;

/// The files, as an operator names them (`--tls-ca`, `--tls-cert`, `--tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA's certificate (PEM).
    pub ca: PathBuf,
    /// This process's certificate (PEM), signed by the CA; intermediates may follow it.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The three flags together, or none: one or two of them is an error that says which
    /// are missing.
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<Self>> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles { ca, cert, key })),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    ("--tls-ca", ca.is_none()),
                    ("--tls-cert", cert.is_none()),
                    ("--tls-key", key.is_none()),
                ]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(f, _)| *f)
                .collect();
                Err(TlsError::Config(format!(
                    "TLS needs --tls-ca, --tls-cert and --tls-key together; missing {}",
                    missing.join(", ")
                )))
            }
        }
    }
}

fn file_err(path: &Path, detail: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The crypto provider every configuration uses: ring, which builds with a C compiler
/// alone (aws-lc-rs, rustls' default, would add its own C build). rustls marks it deprecated
/// because it lacks post-quantum key exchange; the cluster's links use X25519 and TLS 1.3.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A process's loaded TLS identity: how it dials and how it accepts.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its role, from its own certificate.
    pub role: Role,
    /// Its certificate's common name.
    pub name: String,
    /// For dialing: presents the certificate, checks the server's against the CA and the
    /// address dialed.
    pub client: Arc<ClientConfig>,
    /// For accepting: presents the certificate, requires a client certificate from the CA.
    pub server: Arc<ServerConfig>,
}

impl Identity {
    /// Loads and checks the files.
    pub fn load(files: &TlsFiles) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        for ca in certs(&files.ca)? {
            roots.add(ca).map_err(|e| file_err(&files.ca, e))?;
        }
        let roots = Arc::new(roots);
        let chain = certs(&files.cert)?;
        let (role, name) = Role::of_certificate(&chain[0]).map_err(|e| file_err(&files.cert, e))?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_err(&files.key, e))?;
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| file_err(&files.key, format!("does not go with the certificate: {e}")))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| file_err(&files.key, format!("does not go with the certificate: {e}")))?;
        Ok(Identity {
            role,
            name,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// A server configuration for the HTTP API: `cert` (PEM, chain) and `key`, no client
/// certificates (API clients authenticate with keys), HTTP/2 and HTTP/1.1 offered.
pub fn http_server(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain = certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| file_err(key, format!("does not go with the certificate: {e}")))?;
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// A client configuration that trusts the CA in `ca` (PEM) and presents no certificate: for
/// clients of the HTTPS API (and its tests).
pub fn client_trusting(ca: &Path) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    let c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(c))
}
