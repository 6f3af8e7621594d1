//! The compute thread: forward passes run here, never on tokio's workers.

use std::sync::mpsc;
use std::thread::JoinHandle;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kernels::pool;

use proto_types::WireDType;
use tokio::sync::oneshot;

use super::batch::{self, Onward, Pending};
use super::metrics::Metrics;

/// How long a pass may wait for the steps it expects (see [`gather`]).
const GATHER_WINDOW: Duration = Duration::from_millis(2);

/// The next queued work, polling for up to `poll` if there is none yet.
fn poll_for(rx: &mpsc::Receiver<Work>, poll: Duration) -> Option<Work> {
    let start = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(w) => return Some(w),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if start.elapsed() >= poll => return None,
            Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
}

/// `first` plus every forward step already queued that fits beside it; other work, and steps
/// that must wait for another pass, keep their order in `deferred`.
///
/// When fewer steps are queued than the last pass ran (`expect`), it waits up to
/// [`GATHER_WINDOW`] for the rest: the sessions of the last pass send their next steps as soon
/// as its replies reach them, and without the wait the first of them would run alone and the
/// others in the pass after. One session alone never waits.
fn gather(
    first: Pending,
    rx: &mpsc::Receiver<Work>,
    deferred: &mut VecDeque<Work>,
    expect: usize,
) -> Vec<Pending> {
    // a pass's rows: as many as the device takes at once, and no more than its activations
    // can carry on to the next stage in one frame
    let stage = &first.slice.stage;
    let cap = common::generate::max_pass_rows(stage.device().is_cuda())
        .min(proto_types::rows_per_frame(stage.config().hidden));
    let mut rows = first.rows();
    let mut batch = vec![first];
    let mut later = VecDeque::new();
    let mut take = |w: Work, batch: &mut Vec<Pending>, later: &mut VecDeque<Work>| match w {
        Work::Forward(p) if rows + p.rows() <= cap && p.joins(batch) => {
            rows += p.rows();
            batch.push(p);
        }
        w => later.push_back(w),
    };
    while let Some(w) = deferred.pop_front() {
        take(w, &mut batch, &mut later);
    }
    while let Ok(w) = rx.try_recv() {
        take(w, &mut batch, &mut later);
    }
    let until = Instant::now() + GATHER_WINDOW;
    while batch.len() < expect && later.is_empty() {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(w) => take(w, &mut batch, &mut later),
            Err(_) => break,
        }
    }
    *deferred = later;
    batch
}

type Job = Box<dyn FnOnce() + Send>;

enum Work {
    Job(Job),
    Forward(Pending),
}

/// A dedicated thread that runs closures in order, and forward steps in batches: every step
/// queued while the thread was busy joins the next pass (see [`super::batch`]).
#[derive(Debug)]
pub struct Compute {
    tx: Option<mpsc::Sender<Work>>,
    thread: Option<JoinHandle<()>>,
    /// Steps in the last pass (see [`Compute::submit`]).
    last_pass: Arc<AtomicUsize>,
    /// Whether the passes run on the CPU kernel pool (else the pool stays asleep).
    cpu: bool,
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Work::Job(_) => "Job",
            Work::Forward(_) => "Forward",
        })
    }
}

impl Compute {
    /// Starts the thread. Activations for a next stage go to `onward`. `cpu`: the passes run
    /// on the CPU kernel pool (a GPU node's pool is not woken for them). `poll`: how long
    /// the thread polls for work after a pass before it sleeps. `activations`: the wire type
    /// of what goes on to a next stage.
    pub fn start(
        onward: tokio::sync::mpsc::UnboundedSender<Onward>,
        metrics: Arc<Metrics>,
        cpu: bool,
        poll: Duration,
        activations: WireDType,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Work>();
        let last_pass = Arc::new(AtomicUsize::new(0));
        let last = last_pass.clone();
        let thread = std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || {
                let mut deferred: VecDeque<Work> = VecDeque::new();
                loop {
                    let work = match deferred.pop_front() {
                        Some(w) => w,
                        None => match poll_for(&rx, poll) {
                            Some(w) => w,
                            None => {
                                // Nothing queued: the next input comes over the network, so
                                // the kernel threads sleep instead of spinning.
                                pool::global().rest();
                                match rx.recv() {
                                    Ok(w) => w,
                                    Err(_) => break,
                                }
                            }
                        },
                    };
                    let run = || match work {
                        Work::Job(job) => job(),
                        Work::Forward(first) => {
                            let expect = last.load(Ordering::Relaxed);
                            let batch = gather(first, &rx, &mut deferred, expect);
                            last.store(batch.len(), Ordering::Relaxed);
                            let started = Instant::now();
                            // Once the pass is computed, the kernel threads sleep unless more
                            // work is queued: spinning through the replies and sends would
                            // take cores from the stage or client that acts on them next.
                            let mut computed = || {
                                while let Ok(w) = rx.try_recv() {
                                    deferred.push_back(w);
                                }
                                if deferred.is_empty() {
                                    pool::global().rest();
                                }
                            };
                            batch::execute(batch, &onward, &metrics, activations, &mut computed);
                            metrics.busy(started.elapsed());
                        }
                    };
                    // A panicking job fails its own requests (their reply channels drop) and
                    // must not take the thread, and every later request, with it.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
                        tracing::error!(
                            "a compute job panicked; its requests failed, the node goes on"
                        );
                    }
                }
            })?;
        Ok(Compute {
            tx: Some(tx),
            thread: Some(thread),
            last_pass,
            cpu,
        })
    }

    /// Queues a forward step; it runs in the next batch it fits in.
    pub fn submit(&self, p: Pending) {
        if let Some(tx) = &self.tx {
            // A lone session's step runs at once: its kernel threads wake while the compute
            // thread does. Steps of a batch wait for each other (see `gather`), and kernel
            // threads spinning meanwhile would only slow the senders of the rest.
            if self.cpu && self.last_pass.load(Ordering::Relaxed) <= 1 {
                pool::global().wake();
            }
            // If the thread is gone the step drops, and its requester hears so.
            let _ = tx.send(Work::Forward(p));
        }
    }

    /// Queues `f` to run on the compute thread, without waiting for it.
    pub fn post(&self, f: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Work::Job(Box::new(f)));
        }
    }

    /// Runs `f` on the compute thread and awaits its result; `None` if the thread is gone or
    /// `f` panicked.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.tx.as_ref()?.send(Work::Job(job)).ok()?;
        rx.await.ok()
    }
}

impl Drop for Compute {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_for_takes_work_that_comes_while_it_polls() {
        let (tx, rx) = mpsc::channel::<Work>();
        // Nothing queued, no polling: nothing, at once.
        assert!(poll_for(&rx, Duration::ZERO).is_none());
        // Queued work is taken whatever the poll.
        tx.send(Work::Job(Box::new(|| {}))).expect("queued");
        assert!(poll_for(&rx, Duration::ZERO).is_some());
        // Work sent while it polls is taken without sleeping.
        let sender = tx.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            sender.send(Work::Job(Box::new(|| {}))).expect("queued");
        });
        assert!(poll_for(&rx, Duration::from_secs(10)).is_some());
        t.join().expect("sender");
        // A closed channel ends the poll.
        drop(tx);
        let started = Instant::now();
        assert!(poll_for(&rx, Duration::from_secs(10)).is_none());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_stop_the_thread() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let c = Compute::start(tx, Default::default(), true, Duration::ZERO, WireDType::F32)
            .expect("thread");
        assert_eq!(c.run(|| 2 + 2).await, Some(4));
        assert_eq!(c.run(|| -> i32 { panic!("boom") }).await, None);
        assert_eq!(c.run(|| 5).await, Some(5));
    }
}
