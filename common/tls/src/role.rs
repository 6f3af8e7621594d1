//! Roles, carried in a certificate's subject as its organizational unit.

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Result, TlsError};

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Plans, loads and unloads slices, opens sessions: all calls.
    Coordinator,
    /// A shard node: may send steps to its successor, nothing that changes what a node holds.
    Node,
}

impl Role {
    /// The organizational unit that names the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Node => "node",
        }
    }

    /// Parses `coordinator` or `node`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "coordinator" => Ok(Role::Coordinator),
            "node" => Ok(Role::Node),
            other => Err(TlsError::Role(format!(
                "`{other}`: expected `coordinator` or `node`"
            ))),
        }
    }

    /// The role and common name in a DER certificate.
    pub fn of_certificate(der: &[u8]) -> Result<(Self, String)> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| TlsError::Role(format!("unreadable certificate: {e}")))?;
        let subject = cert.subject();
        let mut units = subject.iter_organizational_unit();
        let unit = units
            .next()
            .and_then(|u| u.as_str().ok())
            .ok_or_else(|| TlsError::Role(format!("no OU in the subject `{subject}`")))?;
        if units.next().is_some() {
            return Err(TlsError::Role(format!(
                "more than one OU in the subject `{subject}`"
            )));
        }
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok((Role::parse(unit)?, name))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
