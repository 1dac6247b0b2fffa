//! A queue's worker threads: one list of jobs under a mutex, and a condition variable
//! that wakes one idle worker per job.
//!
//! This replaced an `mpsc` channel whose receiver the workers shared behind a mutex:
//! there the worker holding the mutex slept in `recv` while the others slept on the
//! mutex, so every job woke two threads (the receiver, then the next one to queue up
//! in `recv`), which cost a 4 KiB request at queue depth 16 on an `O_DIRECT` image
//! more CPU time than qemu-storage-daemon's whole request (docs/benchmarks.md,
//! "Session 10"). Here a job wakes one worker, and a batch of jobs is queued under one
//! lock.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};

/// Work for a worker.
pub(super) type Job = Box<dyn FnOnce() + Send>;

/// The jobs not yet taken, and whether the pool is being dropped.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled once per queued job, and for every worker when the pool is dropped.
    more: Condvar,
}

/// The workers of one queue. Dropping it lets them run every queued job, then ends
/// them (without waiting: a job may own the last reference to the pool's owner).
pub(super) struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// Starts `n` workers named after `queue`.
    pub(super) fn spawn(queue: u16, n: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        for i in 0..n {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("vublk-q{queue}-{i}"))
                .spawn(move || s.work())?;
        }
        Ok(Pool { shared })
    }

    /// Queues `jobs` (under one lock) and wakes a worker for each.
    pub(super) fn submit(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut n = 0usize;
        {
            let mut q = self.shared.lock();
            for job in jobs {
                q.jobs.push_back(job);
                n += 1;
            }
        }
        for _ in 0..n {
            self.shared.more.notify_one();
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker: runs jobs until the pool is dropped and no job is left.
    fn work(&self) {
        loop {
            let job = {
                let mut q = self.lock();
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    if q.stop {
                        return;
                    }
                    q = self.more.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            // A job that panics (its request is counted as finished all the same,
            // `backend.rs`) must not take the worker with it: with every worker gone, the
            // jobs queued after it would never run, and the server would wait for them.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.more.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::channel;
    use std::sync::{Arc, Barrier};

    use super::{Job, Pool};

    /// Every job of a batch runs, four at once on four workers (each waits at a barrier
    /// that only four threads together pass), and jobs queued before the pool is
    /// dropped still run.
    #[test]
    fn runs_every_job_side_by_side_and_after_drop() {
        let pool = Pool::spawn(0, 4).unwrap();
        let barrier = Arc::new(Barrier::new(4));
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = channel();
        let jobs = (0..4).map(|_| {
            let (b, r, tx) = (barrier.clone(), ran.clone(), tx.clone());
            Box::new(move || {
                b.wait();
                r.fetch_add(1, Ordering::AcqRel);
                tx.send(()).unwrap();
            }) as Job
        });
        pool.submit(jobs);
        for _ in 0..4 {
            rx.recv().unwrap();
        }
        assert_eq!(ran.load(Ordering::Acquire), 4);
        pool.submit((0..100).map(|_| {
            let (r, tx) = (ran.clone(), tx.clone());
            Box::new(move || {
                r.fetch_add(1, Ordering::AcqRel);
                tx.send(()).unwrap();
            }) as Job
        }));
        drop(pool);
        for _ in 0..100 {
            rx.recv().unwrap();
        }
        assert_eq!(ran.load(Ordering::Acquire), 104);
    }
}
