//! A cluster CA and certificates signed by it (rcgen), for clusters without a PKI of their
//! own: `coordinator certs init` and `coordinator certs issue`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Result, TlsError};
use crate::role::Role;

/// The CA's certificate and key, as `init_ca` names them in its folder.
pub const CA_CERT: &str = "ca.pem";
/// See [`CA_CERT`].
pub const CA_KEY: &str = "ca-key.pem";

fn issue_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Issue(e.to_string())
}

/// Writes `contents` to a new file (never over an existing one), private when `secret`.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = o.open(path).map_err(|e| TlsError::File {
        path: path.display().to_string(),
        detail: if e.kind() == std::io::ErrorKind::AlreadyExists {
            "exists already; remove it or choose another --out".into()
        } else {
            e.to_string()
        },
    })?;
    f.write_all(contents.as_bytes())
        .map_err(|e| TlsError::File {
            path: path.display().to_string(),
            detail: e.to_string(),
        })
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // an hour back: clocks of a cluster's machines differ a little
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
}

/// Writes a new CA into `dir` ([`CA_CERT`], [`CA_KEY`]), valid for `days`.
pub fn init_ca(dir: &Path, name: &str, days: u32) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(issue_err)?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, days);
    let key = KeyPair::generate().map_err(issue_err)?;
    let cert = p.self_signed(&key).map_err(issue_err)?;
    let (c, k) = (dir.join(CA_CERT), dir.join(CA_KEY));
    write_new(&c, &cert.pem(), false)?;
    write_new(&k, &key.serialize_pem(), true)?;
    Ok((c, k))
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct Request {
    /// The holder's role.
    pub role: Role,
    /// Its common name (a node's id, say); also a subject alternative name.
    pub name: String,
    /// More names it is reached at: addresses (IPs) or DNS names.
    pub sans: Vec<String>,
    /// Days valid.
    pub days: u32,
}

/// Issues a certificate and key signed by the CA in `ca_dir`, written to `out` as
/// `NAME.pem` and `NAME-key.pem`.
pub fn issue(ca_dir: &Path, r: &Request, out: &Path) -> Result<(PathBuf, PathBuf)> {
    if r.name.is_empty()
        || !r
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(TlsError::Issue(format!(
            "name `{}`: use letters, digits, '-', '_' and '.'",
            r.name
        )));
    }
    let read = |f: &str| {
        let path = ca_dir.join(f);
        std::fs::read_to_string(&path).map_err(|e| TlsError::File {
            path: path.display().to_string(),
            detail: format!("{e} (run `coordinator certs init` first)"),
        })
    };
    let ca_key = KeyPair::from_pem(&read(CA_KEY)?).map_err(issue_err)?;
    let issuer = Issuer::from_ca_cert_pem(&read(CA_CERT)?, ca_key).map_err(issue_err)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, r.name.as_str());
    p.distinguished_name
        .push(DnType::OrganizationalUnitName, r.role.as_str());
    let mut sans = vec![r.name.clone()];
    sans.extend(r.sans.iter().cloned());
    sans.dedup();
    p.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => s
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| TlsError::Issue(format!("`{s}` as a DNS name: {e}"))),
        })
        .collect::<Result<_>>()?;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // a node both accepts and dials; a coordinator dials
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut p, r.days);
    let key = KeyPair::generate().map_err(issue_err)?;
    let cert = p.signed_by(&key, &issuer).map_err(issue_err)?;
    std::fs::create_dir_all(out).map_err(issue_err)?;
    let (c, k) = (
        out.join(format!("{}.pem", r.name)),
        out.join(format!("{}-key.pem", r.name)),
    );
    write_new(&c, &cert.pem(), false)?;
    write_new(&k, &key.serialize_pem(), true)?;
    Ok((c, k))
}
