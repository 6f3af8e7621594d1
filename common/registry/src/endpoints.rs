//! [`Endpoints`]: one etcd client per listed member, calls pinned to one of them and moved
//! to the next when it fails.
//!
//! etcd-client given several endpoints spreads calls over them and keeps sending to a member
//! that is gone: with one of three members lost, about a third of the calls fail with
//! `dns error` or `tcp connect error` though two members answer, and a plan change, which
//! makes a dozen calls, rarely gets through. Here every call goes to the pinned member;
//! when the connection to it fails the pin moves on and the call is tried on the next one:
//! - a call that was never sent (the connection could not be made) is retried, read or write;
//! - a call whose connection broke, closed or timed out after it was sent is retried if it
//!   only reads, and returned to the caller if it writes (it may have been applied); a try
//!   that has not answered within the connect timeout plus the request timeout counts as
//!   timed out, connecting included;
//! - `Unavailable` from etcd itself (a leader election, no quorum) is retried on the same
//!   member if the call only reads, and does not move the pin;
//! - any other answer from etcd (a refusal, a missing lease) is returned as it is.
//!
//! Calls start on the first listed member, and stay on the member they moved to: list the
//! nearest first.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::Result;

/// What a call does, which decides whether a call that may have been sent is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Reads only: safe to send twice.
    Read,
    /// Writes: sent again only when the first try never left this process.
    Write,
}

/// How a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No connection to the member could be made: nothing was sent.
    NotSent,
    /// The connection broke, closed or timed out during the call (any error raised in this
    /// process rather than sent by etcd): it may have been applied.
    Broken,
    /// etcd answered `Unavailable` (a leader election, no quorum): worth a read's retry,
    /// but the connection is fine.
    Busy,
    /// etcd answered with another error.
    Answer,
}

fn failure(e: &etcd_client::Error) -> Failure {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return match e {
            etcd_client::Error::TransportError(_) => Failure::NotSent,
            _ => Failure::Answer,
        };
    };
    // A status etcd sends carries no source; one made in this process from a transport
    // error (hyper's closed connection, an h2 GOAWAY, a timeout) does.
    let mut source = std::error::Error::source(s);
    let mut local = false;
    while let Some(err) = source {
        if err.downcast_ref::<tonic_etcd::ConnectError>().is_some() {
            return Failure::NotSent;
        }
        local = true;
        source = err.source();
    }
    match s.code() {
        _ if local => Failure::Broken,
        tonic_etcd::Code::Unavailable => Failure::Busy,
        _ => Failure::Answer,
    }
}

/// The members' clients and the pin.
pub(crate) struct Endpoints {
    urls: Vec<String>,
    /// Per member, with the per-request timeout.
    clients: Vec<Client>,
    /// Per member, without it: for the election's campaign, which waits as long as another
    /// leads (a dead connection is found by HTTP/2 keep-alives).
    waiting: Vec<Client>,
    pinned: AtomicUsize,
    /// Times the pin moved.
    failovers: AtomicU64,
    /// Calls that failed before they were sent.
    not_sent: AtomicU64,
    /// Calls whose connection broke or timed out after they were sent.
    broken: AtomicU64,
    /// How long one try of a call on `clients` may take in all, connecting included (the
    /// per-request timeout starts only once a connection is up, and a TLS handshake with a
    /// frozen member has no limit of its own).
    attempt: Duration,
    /// Woken when the pin moves.
    moved: tokio::sync::Notify,
}

/// What [`Endpoints`] counted, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdStats {
    /// Every listed member, and whether calls go to it now.
    pub members: Vec<(String, bool)>,
    /// Times calls moved to the next member.
    pub failovers: u64,
    /// Calls that failed before they were sent (no connection could be made).
    pub not_sent: u64,
    /// Calls whose connection broke or timed out after they were sent.
    pub broken: u64,
}

impl Endpoints {
    /// Clients of `urls` (none connects before its first call); `waiting` has the connect
    /// timeout `connect`, and calls but the campaign get the request timeout `timeout`.
    pub(crate) async fn new(
        urls: &[&str],
        waiting: ConnectOptions,
        connect: Duration,
        timeout: Duration,
    ) -> Result<Self> {
        let quick = waiting.clone().with_timeout(timeout);
        let mut clients = Vec::with_capacity(urls.len());
        let mut slow = Vec::with_capacity(urls.len());
        for url in urls {
            clients.push(Client::connect([*url], Some(quick.clone())).await?);
            slow.push(Client::connect([*url], Some(waiting.clone())).await?);
        }
        Ok(Endpoints {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            clients,
            waiting: slow,
            pinned: AtomicUsize::new(0),
            failovers: AtomicU64::new(0),
            not_sent: AtomicU64::new(0),
            broken: AtomicU64::new(0),
            attempt: connect + timeout,
            moved: tokio::sync::Notify::new(),
        })
    }

    /// The member calls go to now.
    pub(crate) fn pinned(&self) -> &str {
        &self.urls[self.pinned.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// The counts so far.
    pub(crate) fn stats(&self) -> EtcdStats {
        let pinned = self.pinned.load(Ordering::Relaxed) % self.urls.len();
        EtcdStats {
            members: (self.urls.iter().enumerate())
                .map(|(i, u)| (u.clone(), i == pinned))
                .collect(),
            failovers: self.failovers.load(Ordering::Relaxed),
            not_sent: self.not_sent.load(Ordering::Relaxed),
            broken: self.broken.load(Ordering::Relaxed),
        }
    }

    /// Woken when the pin moves (a call that waits long, the election's campaign, starts
    /// again on the new member).
    pub(crate) fn moved(&self) -> &tokio::sync::Notify {
        &self.moved
    }

    /// Moves the pin past member `from` unless another call already did.
    fn fail_over(&self, from: usize, e: &etcd_client::Error) {
        let next = (from + 1) % self.urls.len();
        if next != from
            && self
                .pinned
                .compare_exchange(from, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.failovers.fetch_add(1, Ordering::Relaxed);
            self.moved.notify_waiters();
            tracing::warn!(
                failed = self.urls[from],
                now = self.urls[next],
                "etcd member unreachable ({}): moving to the next",
                crate::error::brief(e)
            );
        }
    }

    /// Runs `f` on the pinned member's client, failing over as the module says. Every member
    /// is tried at least once, and a lone member three times, 50 ms apart.
    pub(crate) async fn call<T, F, Fut>(&self, op: Op, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.run(op, &self.clients, Some(self.attempt), f).await
    }

    /// [`Endpoints::call`] on the clients without a per-request timeout.
    pub(crate) async fn call_waiting<T, F, Fut>(&self, op: Op, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.run(op, &self.waiting, None, f).await
    }

    async fn run<T, F, Fut>(
        &self,
        op: Op,
        clients: &[Client],
        limit: Option<Duration>,
        f: F,
    ) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let tries = clients.len().max(3);
        let mut tried = 0;
        loop {
            let at = self.pinned.load(Ordering::Relaxed) % clients.len();
            let attempt = f(clients[at].clone());
            let r = match limit {
                Some(d) => tokio::time::timeout(d, attempt).await.map_err(|_| d),
                None => Ok(attempt.await),
            };
            let (e, kind) = match r {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let kind = failure(&e);
                    (e, kind)
                }
                Err(d) => {
                    let why = format!("no answer from {} within {d:?}", self.urls[at]);
                    let status = tonic_etcd::Status::deadline_exceeded(why);
                    (etcd_client::Error::GRpcStatus(status), Failure::Broken)
                }
            };
            tried += 1;
            match kind {
                Failure::Answer => return Err(e.into()),
                Failure::Busy => {
                    if op == Op::Write || tried >= tries {
                        return Err(e.into());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Failure::NotSent => self.not_sent.fetch_add(1, Ordering::Relaxed),
                Failure::Broken => self.broken.fetch_add(1, Ordering::Relaxed),
            };
            self.fail_over(at, &e);
            if tried >= tries || (kind == Failure::Broken && op == Op::Write) {
                return Err(e.into());
            }
            if tried % clients.len() == 0 {
                // every member failed once: a short pause before the next round
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
