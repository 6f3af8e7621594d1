//! `health URL`: the probe behind the container images' `HEALTHCHECK`, so that an image needs
//! no curl. `http://HOST:PORT/PATH` must answer a GET with a 2xx status; `tcp://HOST:PORT`
//! must accept a connection (for a port that speaks TLS or tarpc).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{Error, Result};

/// What to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// GET `path` on `addr`; healthy on a 2xx status.
    Http {
        /// host:port
        addr: String,
        /// The path, from its `/`.
        path: String,
    },
    /// Healthy when `addr` accepts a connection.
    Tcp {
        /// host:port
        addr: String,
    },
}

impl std::str::FromStr for Probe {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        let bad = || {
            Error::Config(format!(
                "health probe `{url}`: use http://HOST:PORT/PATH or tcp://HOST:PORT"
            ))
        };
        if let Some(rest) = url.strip_prefix("http://") {
            let (addr, path) = rest
                .split_once('/')
                .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
            if !addr.contains(':') {
                return Err(bad());
            }
            return Ok(Probe::Http {
                addr: addr.to_string(),
                path,
            });
        }
        match url.strip_prefix("tcp://") {
            Some(addr) if addr.contains(':') && !addr.contains('/') => Ok(Probe::Tcp {
                addr: addr.to_string(),
            }),
            _ => Err(bad()),
        }
    }
}

/// The `health` subcommand of both binaries.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// http://HOST:PORT/PATH (healthy on a 2xx answer) or tcp://HOST:PORT (on a connection).
    #[arg(env = "LLMC_HEALTH_URL")]
    pub url: Probe,
    /// Give up after this many milliseconds per step.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

impl HealthArgs {
    /// Probes; an error says what failed.
    pub fn run(&self) -> Result<()> {
        self.url.check(Duration::from_millis(self.timeout_ms))
    }
}

impl Probe {
    /// Runs the probe, giving up after `timeout` per step.
    pub fn check(&self, timeout: Duration) -> Result<()> {
        let addr = match self {
            Probe::Http { addr, .. } | Probe::Tcp { addr } => addr,
        };
        let failed = |e: String| Error::Unhealthy(format!("{addr}: {e}"));
        let sock = addr
            .to_socket_addrs()
            .map_err(|e| failed(e.to_string()))?
            .next()
            .ok_or_else(|| failed("no address".into()))?;
        let mut conn =
            TcpStream::connect_timeout(&sock, timeout).map_err(|e| failed(e.to_string()))?;
        let Probe::Http { path, .. } = self else {
            return Ok(());
        };
        conn.set_read_timeout(Some(timeout))
            .and_then(|()| conn.set_write_timeout(Some(timeout)))
            .map_err(|e| failed(e.to_string()))?;
        // one write: a request in pieces may reach a server that answers the first
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        conn.write_all(request.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
        // the status line is all that matters; read at most a little of the rest
        let mut head = Vec::with_capacity(256);
        conn.take(4096)
            .read_to_end(&mut head)
            .map_err(|e| failed(e.to_string()))?;
        let text = String::from_utf8_lossy(&head);
        let status = text.lines().next().unwrap_or_default();
        let code = status.split_whitespace().nth(1).unwrap_or_default();
        if code.starts_with('2') && code.len() == 3 {
            Ok(())
        } else {
            Err(failed(format!("GET {path}: `{status}`")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(reply: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut got = Vec::new();
                let mut buf = [0u8; 512];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(reply.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn http_needs_a_2xx_and_tcp_a_listener() {
        let t = Duration::from_secs(2);
        let ok = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        let p: Probe = format!("http://{ok}/health").parse().expect("url");
        assert_eq!(
            p,
            Probe::Http {
                addr: ok.clone(),
                path: "/health".into()
            }
        );
        p.check(t).expect("healthy");
        let down = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let e = format!("http://{down}/health")
            .parse::<Probe>()
            .expect("url")
            .check(t)
            .expect_err("503 is not healthy");
        assert!(e.to_string().contains("503"), "{e}");
        let open = serve_once("");
        format!("tcp://{open}")
            .parse::<Probe>()
            .expect("url")
            .check(t)
            .expect("listening");
        // a port nobody listens on
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let gone = l.local_addr().expect("addr");
        drop(l);
        assert!(format!("tcp://{gone}")
            .parse::<Probe>()
            .expect("url")
            .check(t)
            .is_err());
        for bad in ["ftp://x:1", "http://nohost", "tcp://x:1/path", "x"] {
            assert!(bad.parse::<Probe>().is_err(), "{bad}");
        }
    }
}
