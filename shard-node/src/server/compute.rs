//! The compute thread: forward passes run here, never on tokio's workers.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// A dedicated thread that runs closures in order.
#[derive(Debug)]
pub struct Compute {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Compute {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || {
                for job in rx {
                    // A panicking job fails its own request (its reply channel drops) and
                    // must not take the thread, and every later request, with it.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!(
                            "a compute job panicked; the request failed, the node goes on"
                        );
                    }
                }
            })?;
        Ok(Compute {
            tx: Some(tx),
            thread: Some(thread),
        })
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
        self.tx.as_ref()?.send(job).ok()?;
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

    #[tokio::test]
    async fn a_panicking_job_does_not_stop_the_thread() {
        let c = Compute::start().expect("thread");
        assert_eq!(c.run(|| 2 + 2).await, Some(4));
        assert_eq!(c.run(|| -> i32 { panic!("boom") }).await, None);
        assert_eq!(c.run(|| 5).await, Some(5));
    }
}
