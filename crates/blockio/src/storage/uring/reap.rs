//! Who reaps a ring's completions: a thread that waits for requests reaps them itself,
//! in its own `io_uring_enter`; the ring's completion thread does it only when no such
//! thread is waiting.
//!
//! A read or write on a regular file completes in the kernel as task work of the thread
//! that submitted it: that thread has to run before the completion is posted. When the
//! completion thread reaped everything, a completed request took three hops (the
//! submitter runs the task work, the completion thread wakes to reap, the submitter
//! wakes again for its result); a submitter that waits in the ring itself
//! (`IORING_ENTER_GETEVENTS`) runs the task work and reaps in one wakeup, as qemu's
//! event loop does.
//!
//! The completion thread waits on an eventfd the kernel signals as completions are
//! posted. A thread that takes the ring ([`Shared::wait_in_ring`]) turns those signals
//! off (`IORING_CQ_EVENTFD_DISABLED`) while it waits, so the completion thread sleeps
//! through completions someone is reaping anyway; on leaving it turns them back on and
//! reaps once more what was posted meanwhile. One race remains (a completion posted
//! while the flag changes back can be missed by both): whenever requests are still in
//! flight after a thread leaves, the completion thread looks at the ring at least every
//! [`POLL_IN_FLIGHT`] rather than only when signalled.
//!
//! Every completion-queue access (reaping, the eventfd flag) happens under the state
//! lock; [`State::user_reaping`](super::ring) marks the one thread allowed to wait in
//! the kernel for completions meanwhile.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};

use super::ring::{Complete, STOP, Shared, State};

/// How often the completion thread looks at a ring with requests in flight when no
/// signal came (the bound on a completion missed by the race in the module docs).
const POLL_IN_FLIGHT: Duration = Duration::from_millis(10);

/// Completions taken from the ring, to run once the state lock is dropped.
pub(super) type Done = Vec<(Box<dyn Complete>, i32)>;

/// The eventfd the kernel signals when it posts completions (and [`Drop`] of the ring,
/// to stop the completion thread).
#[derive(Debug)]
pub(super) struct Notify(OwnedFd);

impl Notify {
    pub(super) fn new() -> io::Result<Self> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self(fd))
    }

    pub(super) fn fd(&self) -> &OwnedFd {
        &self.0
    }

    /// Wakes the completion thread.
    pub(super) fn signal(&self) {
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Waits until signalled or `timeout` passes (`None`: no timeout), then clears the
    /// signal.
    fn wait(&self, timeout: Option<Duration>) {
        let ts = timeout.map(|t| Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
        let _ = poll(&mut fds, ts.as_ref());
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.0, &mut buf);
    }
}

impl Shared {
    /// Takes every posted completion off the ring into `done`. With the state locked.
    pub(super) fn drain(&self, st: &mut State, done: &mut Done) {
        self.take_completions(st, |st, idx, res| {
            if idx == STOP {
                st.in_flight -= 1;
                return;
            }
            let idx = usize::try_from(idx).unwrap_or(usize::MAX);
            if let Some(c) = st.slots.get_mut(idx).and_then(Option::take) {
                st.in_flight -= 1;
                st.free.push(idx);
                done.push((c, res));
            }
        });
    }

    /// Makes the calling thread the one that waits in the ring, when no other does and
    /// requests are in flight: the completion thread's signals stop until it leaves.
    pub(super) fn try_take(&self, st: &mut State) -> bool {
        if st.user_reaping || st.in_flight == 0 {
            return false;
        }
        st.user_reaping = true;
        self.set_eventfd(st, false);
        true
    }

    /// Waits in the ring for completions (the calling thread must have taken it with
    /// [`Shared::try_take`]), submitting what is queued in the same call; reaps them,
    /// gives the ring back and runs them here. False when the kernel refused the wait
    /// (the caller then waits for the completion thread instead of retrying at once).
    pub(super) fn reap_here(&self) -> bool {
        let mut done = Done::new();
        loop {
            let failed = match self.ring.submit_and_wait(1) {
                Ok(_) => false,
                Err(e) => e.kind() != io::ErrorKind::Interrupted,
            };
            let mut st = self.lock();
            self.drain(&mut st, &mut done);
            let pushed = self.fill(&mut st);
            if done.is_empty() && st.in_flight > 0 && !failed {
                // Pushed entries go to the kernel with the next `submit_and_wait`.
                continue;
            }
            st.user_reaping = false;
            self.set_eventfd(&mut st, true);
            // What was posted while the signals were off.
            self.drain(&mut st, &mut done);
            let pushed = self.fill(&mut st) || pushed;
            let wake = st.in_flight > 0 && st.idle;
            st.idle &= !wake;
            drop(st);
            if pushed {
                self.kick();
            }
            if wake {
                self.notify.signal();
            }
            for (c, res) in done.drain(..) {
                c.complete(res);
            }
            return !failed;
        }
    }

    /// Waits in the ring and runs what completes on the calling thread, when it has
    /// requests in flight and no other thread waits in it; false (nothing done) when
    /// the caller must wait its own way (its completions then come from whoever reaps).
    pub(crate) fn wait_in_ring(&self) -> bool {
        let mut st = self.lock();
        if !self.try_take(&mut st) {
            return false;
        }
        drop(st);
        self.reap_here()
    }

    /// The completion thread: reaps whenever no other thread waits in the ring, and
    /// refills from the backlog; stops once asked to and nothing is left in flight.
    pub(super) fn completion_thread(&self) {
        let mut done = Done::new();
        loop {
            let timeout = {
                let mut st = self.lock();
                st.idle = st.in_flight == 0 && !st.stopping;
                (!st.idle).then_some(POLL_IN_FLIGHT)
            };
            self.notify.wait(timeout);
            let mut st = self.lock();
            st.idle = false;
            let pushed = if st.user_reaping {
                false
            } else {
                self.drain(&mut st, &mut done);
                self.fill(&mut st)
            };
            let finished = st.stopping && st.in_flight == 0 && st.backlog.is_empty();
            drop(st);
            if pushed {
                self.kick();
            }
            for (c, res) in done.drain(..) {
                c.complete(res);
            }
            if finished {
                return;
            }
        }
    }
}

thread_local! {
    /// The ring the calling thread submitted to last ([`park_until`] waits in it).
    static LAST: RefCell<Weak<Shared>> = const { RefCell::new(Weak::new()) };
}

/// Remembers `ring` as the calling thread's last.
pub(super) fn note(ring: &Arc<Shared>) {
    LAST.with(|l| {
        let mut l = l.borrow_mut();
        if l.as_ptr() != Arc::as_ptr(ring) {
            *l = Arc::downgrade(ring);
        }
    });
}

/// Blocks until `ready()`; meanwhile reaps the calling thread's last ring when it has
/// requests in flight and no other thread waits in it, else parks the thread (see
/// [`crate::park_until`], which first submits what the thread's plug holds back).
pub(crate) fn park_until(ready: &dyn Fn() -> bool) {
    loop {
        if ready() {
            return;
        }
        let ring = LAST.with(|l| l.borrow().upgrade());
        if ring.is_some_and(|r| r.wait_in_ring()) {
            continue;
        }
        std::thread::park();
    }
}
