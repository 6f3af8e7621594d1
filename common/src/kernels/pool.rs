//! A small spinning thread pool for the kernels' parallel loops.
//!
//! A decode step runs ~150 parallel regions of 20–100 µs each. rayon parks idle workers on a
//! futex, and waking them cost ~17% of decode time in profiles. Here workers spin briefly
//! between regions (as llama.cpp's threads do), then yield, then sleep on a condvar, so an
//! idle node does not burn its cores. Only one thread drives the pool at a time; a second
//! caller (or a call from inside a task) runs its loop inline.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Spinning this long without work sends a worker to yield, then to sleep.
const SPIN: Duration = Duration::from_millis(2);

struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
}

impl Job<'_> {
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                break;
            }
            (self.f)(i);
        }
    }
}

struct Shared {
    epoch: AtomicU64,
    job: AtomicPtr<Job<'static>>,
    finished: Vec<AtomicU64>,
    shutdown: AtomicBool,
    /// Set by [`Pool::rest`]: skip the spinning and sleep until the next loop.
    resting: AtomicBool,
    /// Bumped by [`Pool::wake`]: a worker woken by it spins afresh.
    wakes: AtomicU64,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

/// The pool: `threads - 1` workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    driver: Mutex<()>,
    threads: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
    }
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the global pool's size; only the first call (or first use) decides.
pub fn init(threads: usize) -> usize {
    POOL.get_or_init(|| Pool::new(threads.max(1))).threads
}

/// The global pool (sized to the machine if [`init`] was not called).
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(std::thread::available_parallelism().map_or(1, |n| n.get())))
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            finished: (1..threads).map(|_| AtomicU64::new(0)).collect(),
            shutdown: AtomicBool::new(false),
            resting: AtomicBool::new(false),
            wakes: AtomicU64::new(0),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        for w in 0..threads - 1 {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("kernel-{w}"))
                .spawn(move || worker(&s, w))
                .expect("cannot spawn a kernel thread");
        }
        Pool {
            shared,
            driver: Mutex::new(()),
            threads,
        }
    }

    /// Threads working on each loop, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Sends the workers to sleep now rather than after spinning: for a caller that knows no
    /// loop follows soon (a node whose forward pass is done and whose next input comes over
    /// the network). Spinning then would only take cores from the processes it waits on. The
    /// next [`Pool::run`] wakes them.
    pub fn rest(&self) {
        self.shared.resting.store(true, Ordering::Relaxed);
    }

    /// Wakes resting workers ahead of a loop that is about to come (a node that has just
    /// received a step), so that their wake-up overlaps the caller's own, instead of
    /// following it at the first loop. They spin, then sleep again if no loop comes.
    pub fn wake(&self) {
        self.shared.resting.store(false, Ordering::Relaxed);
        self.shared.wakes.fetch_add(1, Ordering::Relaxed);
        self.notify_sleepers();
    }

    fn notify_sleepers(&self) {
        if *self
            .shared
            .sleepers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            > 0
        {
            self.shared.wake.notify_all();
        }
    }

    /// Calls `f(i)` for every `i` in `0..n`, spread over the pool; returns when all are done.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        let guard = match self.driver.try_lock() {
            Ok(g) if self.threads > 1 && n > 1 => g,
            _ => {
                (0..n).for_each(f);
                return;
            }
        };
        let job = Job {
            f,
            n,
            next: AtomicUsize::new(0),
        };
        // SAFETY: workers dereference this pointer only between seeing the new epoch and
        // storing it in `finished`; we wait for every worker's `finished` below before `job`
        // goes out of scope, so the pointer never outlives the borrow it erases.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        self.shared.resting.store(false, Ordering::Relaxed);
        self.shared.job.store(ptr, Ordering::Release);
        let epoch = self.shared.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.notify_sleepers();
        job.work();
        for fin in &self.shared.finished {
            while fin.load(Ordering::Acquire) < epoch {
                std::hint::spin_loop();
            }
        }
        self.shared
            .job
            .store(std::ptr::null_mut(), Ordering::Release);
        drop(guard);
    }
}

fn worker(s: &Shared, w: usize) {
    let mut seen = 0u64;
    loop {
        let mut start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            // Read the clock only every 64 spins.
            let resting = s.resting.load(Ordering::Relaxed);
            if !resting && (!spins.is_multiple_of(64) || start.elapsed() < SPIN) {
                std::hint::spin_loop();
            } else if !resting && start.elapsed() < SPIN * 4 {
                std::thread::yield_now();
            } else {
                let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                *sleepers += 1;
                let wakes = s.wakes.load(Ordering::Relaxed);
                if s.epoch.load(Ordering::Acquire) == seen {
                    sleepers = s
                        .wake
                        .wait_timeout(sleepers, Duration::from_millis(100))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                *sleepers -= 1;
                if s.wakes.load(Ordering::Relaxed) != wakes {
                    start = Instant::now();
                }
            }
        };
        let ptr = s.job.load(Ordering::Acquire);
        // SAFETY: the driver published `ptr` before bumping the epoch and keeps the job alive
        // until we store `epoch` in `finished` below.
        if let Some(job) = unsafe { ptr.as_ref() } {
            job.work();
        }
        s.finished[w].store(epoch, Ordering::Release);
        seen = epoch;
    }
}

/// Runs `f(i)` for `i in 0..n` on the global pool.
pub fn parallel_for(n: usize, f: impl Fn(usize) + Sync) {
    global().run(n, &f);
}

/// Splits `out` into chunks of `chunk` and runs `f(chunk_index, chunk)` on the global pool.
pub fn parallel_chunks_mut<T: Send>(
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let len = out.len();
    let n = len.div_ceil(chunk);
    let base = SendPtr(out.as_mut_ptr());
    parallel_for(n, |c| {
        let start = c * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: chunks [start, end) are disjoint for distinct `c` and lie inside `out`,
        // which stays mutably borrowed for the whole call.
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(c, part);
    });
}

struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: only used to hand disjoint sub-slices to pool tasks (see `parallel_chunks_mut`).
unsafe impl<T: Send> Sync for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_once_and_chunks_disjoint() {
        let pool = Pool::new(3);
        for n in [0usize, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
        let mut v = vec![0usize; 103];
        parallel_chunks_mut(&mut v, 10, |c, part| {
            part.iter_mut().for_each(|x| *x += c + 1)
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == i / 10 + 1));
    }

    fn sleepers(pool: &Pool) -> usize {
        *pool
            .shared
            .sleepers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn wake_rouses_a_resting_worker_before_its_timeout() {
        let pool = Pool::new(2);
        pool.run(4, &|_| {});
        pool.rest();
        let t = Instant::now();
        while sleepers(&pool) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the worker never slept"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Asleep on a 100 ms timed wait; `wake` must end it at once.
        let woken = Instant::now();
        pool.wake();
        while sleepers(&pool) > 0 {
            std::thread::yield_now();
        }
        assert!(
            woken.elapsed() < Duration::from_millis(60),
            "woken after {:?}",
            woken.elapsed()
        );
        // And the pool still computes.
        let hits: Vec<AtomicUsize> = (0..50).map(|_| AtomicUsize::new(0)).collect();
        pool.run(50, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }
}
