//! The async face's runtime-free parts: [`IoFuture`], completed from any thread, and a
//! small pool of worker threads for what the kernel cannot do without blocking a thread
//! (format metadata, writes, flushes, reads of devices without a layout walk).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use crate::error::Result;

/// Where a result waits for its future.
pub(crate) struct Slot<T> {
    state: Mutex<(Option<Result<T>>, Option<Waker>)>,
}

impl<T> Slot<T> {
    /// Stores the result and wakes the future's task.
    pub(crate) fn complete(&self, v: Result<T>) {
        let waker = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.0 = Some(v);
            st.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The result of one [`AsyncDevice`](crate::AsyncDevice) request. It needs no
/// particular executor: whichever thread finishes the request (an io_uring completion
/// thread or a worker) wakes the task that polled it last. Dropping it early is safe:
/// the request still runs to its end and its buffer is freed then.
#[must_use = "futures do nothing unless polled"]
pub struct IoFuture<T> {
    slot: Arc<Slot<T>>,
}

impl<T> IoFuture<T> {
    /// A future and the slot that completes it.
    pub(crate) fn new() -> (Self, Arc<Slot<T>>) {
        let slot = Arc::new(Slot {
            state: Mutex::new((None, None)),
        });
        (Self { slot: slot.clone() }, slot)
    }

    /// A future that is already complete.
    pub(crate) fn ready(v: Result<T>) -> Self {
        let (f, slot) = Self::new();
        slot.complete(v);
        f
    }
}

impl<T> Future for IoFuture<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let mut st = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                st.1 = Some(cx.waker().clone());
                drop(st);
                // About to wait: what this thread's plug holds back must go first.
                #[cfg(target_os = "linux")]
                crate::storage::plug::flush();
                Poll::Pending
            }
        }
    }
}

impl<T> std::fmt::Debug for IoFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoFuture")
    }
}

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stop: bool,
}

/// The shared half of [`Pool`] (what jobs and completions may hold).
#[derive(Default)]
pub(crate) struct PoolShared {
    queue: Mutex<Queue>,
    cv: Condvar,
}

impl PoolShared {
    /// Runs `job` on a worker.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.jobs.push_back(Box::new(job));
        drop(q);
        self.cv.notify_one();
    }

    fn work(&self) {
        loop {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let job = loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.stop {
                    return;
                }
                q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            };
            drop(q);
            job();
        }
    }
}

/// Worker threads; dropping the pool lets them finish every queued job, then stops them.
pub(crate) struct Pool {
    pub(crate) shared: Arc<PoolShared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// `n` workers (at least one).
    pub(crate) fn new(n: usize) -> std::io::Result<Self> {
        let shared = Arc::new(PoolShared::default());
        let threads = (0..n.max(1))
            .map(|_| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name("diskimg-aio".into())
                    .spawn(move || s.work())
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Self { shared, threads })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop = true;
        self.shared.cv.notify_all();
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}
