//! Dialing and accepting the cluster's connections, over plain TCP or mutual TLS.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proto_types::{ConnectError, HelloAck, ShardNodeClient};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::{Result, TlsError};
use crate::files::Identity;
use crate::role::Role;

/// How this process reaches nodes: plain TCP, or TLS presenting its certificate and checking
/// the node's against the CA and the address dialed.
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    tls: Option<Arc<Identity>>,
}

static DIALER: OnceLock<Dialer> = OnceLock::new();

/// The host part of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl Dialer {
    /// Dials with TLS when `tls` is set, else plain TCP.
    pub fn new(tls: Option<Arc<Identity>>) -> Self {
        Dialer { tls }
    }

    /// Sets the process's dialer, once, at start-up; later calls are refused.
    pub fn install(self) -> Result<()> {
        DIALER
            .set(self)
            .map_err(|_| TlsError::Config("the dialer is already set".into()))
    }

    /// The process's dialer: the installed one, else plain TCP.
    pub fn global() -> &'static Dialer {
        DIALER.get_or_init(Dialer::default)
    }

    /// Whether it dials with TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects to `addr`, then the TLS handshake if configured, then the protocol's hello as
    /// `client`, all within `timeout`.
    pub async fn connect(
        &self,
        addr: &str,
        client: &str,
        timeout: Duration,
    ) -> Result<(ShardNodeClient, HelloAck), ConnectError> {
        let Some(id) = &self.tls else {
            return proto_types::connect(addr, client, timeout).await;
        };
        let transport = |d: String| ConnectError::Transport(d);
        let dial = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| transport(e.to_string()))?;
            tcp.set_nodelay(true)
                .map_err(|e| transport(format!("TCP_NODELAY: {e}")))?;
            let name = ServerName::try_from(host_of(addr).to_string())
                .map_err(|e| transport(format!("`{addr}` as a TLS server name: {e}")))?;
            TlsConnector::from(id.client.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| transport(format!("TLS handshake with {addr}: {e}")))
        };
        let tls = tokio::time::timeout(timeout, dial)
            .await
            .map_err(|_| transport("connect timed out".into()))??;
        // The CA signed it and it names `addr`; it must also be a node's.
        let role = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Role::of_certificate(c).map(|(r, _)| r));
        match role {
            Some(Ok(Role::Node)) => {}
            Some(Ok(other)) => {
                return Err(transport(format!(
                    "{addr} presented a {other} certificate, not a node's"
                )))
            }
            Some(Err(e)) => return Err(transport(format!("{addr}: {e}"))),
            None => return Err(transport(format!("{addr} presented no certificate"))),
        }
        proto_types::handshake(tls, client, timeout).await
    }
}

/// A connection as accepted: plain TCP, or TLS.
pub type Stream = tokio_util::either::Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// Who is at the other end of an accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Plain TCP: no identity, every call allowed (TLS is off).
    Unauthenticated,
    /// A certificate from the cluster CA, with its role and common name.
    Verified {
        /// The role its certificate names.
        role: Role,
        /// Its common name.
        name: String,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unauthenticated => f.write_str("unauthenticated"),
            Peer::Verified { role, name } => write!(f, "{role} `{name}`"),
        }
    }
}

impl Peer {
    /// Whether it may act as `role` needs: without TLS everyone may.
    pub fn may(&self, role: Role) -> bool {
        match self {
            Peer::Unauthenticated => true,
            Peer::Verified { role: r, .. } => *r == role,
        }
    }
}

/// How a node accepts connections.
#[derive(Clone)]
pub struct Acceptor {
    tls: Option<TlsAcceptor>,
    deadline: Duration,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("tls", &self.tls.is_some())
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Acceptor {
    /// Accepts with TLS when `tls` is set, the handshake within `deadline`.
    pub fn new(tls: Option<&Identity>, deadline: Duration) -> Self {
        Acceptor {
            tls: tls.map(|id| TlsAcceptor::from(id.server.clone())),
            deadline,
        }
    }

    /// Whether it requires TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Completes a TCP connection from `peer`: with TLS, the handshake (which fails on the
    /// first bytes of anything that is not a TLS client hello) and the certificate's role.
    pub async fn accept(&self, tcp: TcpStream, peer: &str) -> Result<(Stream, Peer)> {
        let Some(acceptor) = &self.tls else {
            return Ok((Stream::Left(tcp), Peer::Unauthenticated));
        };
        let failed = |detail: String| TlsError::Handshake {
            peer: peer.to_string(),
            detail,
        };
        let tls = tokio::time::timeout(self.deadline, acceptor.accept(tcp))
            .await
            .map_err(|_| failed(format!("nothing completed within {:?}", self.deadline)))?
            .map_err(|e| failed(e.to_string()))?;
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| failed("no client certificate".into()))?;
        let (role, name) = Role::of_certificate(cert).map_err(|e| failed(e.to_string()))?;
        Ok((Stream::Right(tls), Peer::Verified { role, name }))
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("node-a.internal:7000"), "node-a.internal");
    }
}
