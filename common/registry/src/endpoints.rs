//! [`Endpoints`]: one etcd client per listed member, calls pinned to one of them and moved
//! to the next when it fails.
//!
//! etcd-client given several endpoints spreads calls over them and keeps sending to a member
//! that is gone: with one of three members lost, about a third of the calls fail with
//! `dns error` or `tcp connect error` though two members answer, and a plan change, which
//! makes a dozen calls, rarely gets through. Here every call goes to the pinned member;
//! when the connection to it fails the pin moves on and the call is tried on the next one:
//! - a call that was never sent (the connection could not be made) is retried, read or write;
//! - a call whose connection broke or timed out after it was sent is retried if it only reads,
//!   and returned to the caller if it writes (it may have been applied);
//! - an answer from etcd (a refusal, a missing lease) is returned as it is.
//!
//! The first listed member is preferred: list the nearest first.

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
    /// The connection broke or timed out during the call: it may have been applied.
    Broken,
    /// etcd answered with an error.
    Answer,
}

fn failure(e: &etcd_client::Error) -> Failure {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return match e {
            etcd_client::Error::TransportError(_) => Failure::NotSent,
            _ => Failure::Answer,
        };
    };
    let mut source = std::error::Error::source(s);
    let mut local = false;
    while let Some(err) = source {
        if err.downcast_ref::<tonic_etcd::ConnectError>().is_some() {
            return Failure::NotSent;
        }
        if err.downcast_ref::<tonic_etcd::TimeoutExpired>().is_some() {
            return Failure::Broken;
        }
        local = true;
        source = err.source();
    }
    match s.code() {
        // etcd without a leader, a refused stream, an expired HTTP/2 ping
        tonic_etcd::Code::Unavailable => Failure::Broken,
        // a transport error in this process (a status etcd sends has no source)
        tonic_etcd::Code::Unknown if local => Failure::Broken,
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
    /// Clients of `urls` (none connects before its first call).
    pub(crate) async fn new(
        urls: &[&str],
        waiting: ConnectOptions,
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
        self.run(op, &self.clients, f).await
    }

    /// [`Endpoints::call`] on the clients without a per-request timeout.
    pub(crate) async fn call_waiting<T, F, Fut>(&self, op: Op, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.run(op, &self.waiting, f).await
    }

    async fn run<T, F, Fut>(&self, op: Op, clients: &[Client], f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let tries = clients.len().max(3);
        let mut tried = 0;
        loop {
            let at = self.pinned.load(Ordering::Relaxed) % clients.len();
            let e = match f(clients[at].clone()).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            tried += 1;
            let kind = failure(&e);
            match kind {
                Failure::Answer => return Err(e.into()),
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
