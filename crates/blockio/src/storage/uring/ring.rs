//! One io_uring instance shared by any number of threads: submissions from any thread,
//! completions reaped by a thread waiting for them, or else by a completion thread of
//! the ring's own (`reap.rs`).
//!
//! # Why this module uses `unsafe`
//!
//! The kernel reads and writes the memory a submission points to until the request
//! completes, outside anything the borrow checker can see. Two kinds of `unsafe` are
//! needed, and nothing else in the crate uses any:
//! - [`Uring::submit`] is an `unsafe fn`: its caller promises that the buffers (and iovec
//!   arrays) an entry points to stay valid, and are not otherwise accessed, until the
//!   entry's [`Complete::complete`] has been called. The two callers keep that promise
//!   by construction: the blocking path ([`Uring::run`]) borrows the caller's buffers and
//!   does not return before the completion, whatever happens; the async path moves the
//!   buffer into the completion object itself, which the ring owns until it completes.
//! - The io-uring crate's `submission_shared` / `completion_shared` hand out the rings'
//!   queues from `&self` on the promise that no other handle to the same queue exists:
//!   every submission-queue and completion-queue access happens under
//!   [`Shared::state`]'s lock.
//!
//! A request is only ever pushed to the submission queue while fewer than `depth`
//! requests are in flight (the rest wait in a backlog the completion thread drains), so
//! the completion queue (twice the submission queue) cannot overflow.
//!
//! The kernel also writes the eventfd registered with the ring (`reap.rs`), which it
//! holds a reference to of its own.
//!
//! `owned.rs` (a ring its owner reaps, with detached reads into memory the caller
//! vouches for) pushes entries through [`Shared::push`] under the same rules.

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, squeue, types::Fd};

use super::reap::{self, Notify};
use crate::aio::IoBuf;

/// What runs when a request completes: gets the kernel's result (bytes, or `-errno`).
pub(crate) trait Complete: Send {
    /// Called once, on the thread that reaped the completion (the ring's completion
    /// thread or one that waited in the ring), after the kernel is done with the memory.
    fn complete(self: Box<Self>, result: i32);
}

/// Largest single read or write (longer requests are continued by the caller).
const MAX_IO: u32 = 1 << 30;
/// Most buffers in one vectored request (Linux's `IOV_MAX`).
pub(super) const IOV_MAX: usize = 1024;

/// The `user_data` of the entry that stops the completion thread.
pub(super) const STOP: u64 = u64::MAX;

#[derive(Default)]
pub(super) struct State {
    /// Completion of each request in flight, indexed by its `user_data`.
    pub(super) slots: Vec<Option<Box<dyn Complete>>>,
    pub(super) free: Vec<usize>,
    /// Entries waiting for room (more than `depth` requests asked for).
    pub(super) backlog: VecDeque<squeue::Entry>,
    pub(super) in_flight: usize,
    pub(super) stopping: bool,
    /// A thread other than the completion thread waits in the ring for completions
    /// (`reap.rs`); it alone reaps meanwhile.
    pub(super) user_reaping: bool,
    /// The completion thread sleeps until signalled (nothing was in flight).
    pub(super) idle: bool,
}

pub(super) struct Shared {
    pub(super) ring: IoUring,
    state: Mutex<State>,
    pub(super) depth: usize,
    pub(super) notify: Notify,
}

/// One io_uring instance and the thread that reaps its completions, shared by any
/// number of [`UringStorage`](super::UringStorage)s and threads (`Arc<Uring>`).
/// Dropping the last handle waits for every request still in flight.
pub struct Uring {
    pub(super) shared: Arc<Shared>,
    /// The completion thread (`None`: an owned ring, `owned.rs`).
    pub(super) thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("depth", &self.shared.depth)
            .finish()
    }
}

impl Uring {
    /// A ring taking up to `depth` requests at once (clamped to 1..=4096); more wait in
    /// a queue of their own. Fails where the kernel has no io_uring (or it is disabled:
    /// `/proc/sys/kernel/io_uring_disabled`).
    pub fn new(depth: usize) -> io::Result<Self> {
        let shared = Shared::new(depth)?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("diskimg-uring".into())
            .spawn(move || s.completion_thread())?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The most requests in flight at once (the queue depth).
    pub fn depth(&self) -> usize {
        self.shared.depth
    }

    /// Queues `entry` (its `user_data` is set here) and submits it; `done` runs when it
    /// completes.
    ///
    /// # Safety
    ///
    /// Every buffer and iovec array `entry` points to must stay valid, and must not be
    /// read or written by anyone else (for a kernel write: not even read), until
    /// `done.complete` has been called.
    pub(crate) unsafe fn submit(&self, entry: squeue::Entry, done: Box<dyn Complete>) {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.submit_with(entry, done, true) }
    }

    /// [`Uring::submit`]; `may_defer`: while the thread holds a [`Plug`](crate::Plug),
    /// the entry waits in the submission queue for the plug's one `io_uring_enter`.
    ///
    /// # Safety
    ///
    /// As for [`Uring::submit`].
    unsafe fn submit_with(&self, entry: squeue::Entry, done: Box<dyn Complete>, may_defer: bool) {
        let mut st = self.shared.lock();
        // SAFETY: the caller's promise, passed on.
        let pushed = unsafe { self.shared.push(&mut st, entry, done) };
        drop(st);
        reap::note(&self.shared);
        if pushed && !(may_defer && super::plug::defer(&self.shared)) {
            self.shared.kick();
        }
    }

    /// `pread` through the ring: reads up to `buf.len()` (at most 1 GiB) bytes at
    /// `offset`; the kernel's result (bytes read, or `-errno`).
    pub(crate) fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> i32 {
        let len = u32::try_from(buf.len()).unwrap_or(MAX_IO).min(MAX_IO);
        let e = opcode::Read::new(Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len).offset(offset);
        // SAFETY: `buf` is borrowed mutably for the whole call.
        unsafe { self.run(e.build()) }
    }

    /// `pwrite` through the ring (see [`Uring::read`]).
    pub(crate) fn write(&self, fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> i32 {
        let len = u32::try_from(buf.len()).unwrap_or(MAX_IO).min(MAX_IO);
        let e = opcode::Write::new(Fd(fd.as_raw_fd()), buf.as_ptr(), len).offset(offset);
        // SAFETY: `buf` is borrowed for the whole call; the kernel only reads it.
        unsafe { self.run(e.build()) }
    }

    /// `preadv` through the ring, of at most `IOV_MAX` buffers.
    pub(crate) fn readv(
        &self,
        fd: BorrowedFd<'_>,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> i32 {
        let n = u32::try_from(bufs.len().min(IOV_MAX)).unwrap_or(1024);
        let iov = bufs.as_mut_ptr().cast_const().cast();
        let e = opcode::Readv::new(Fd(fd.as_raw_fd()), iov, n).offset(offset);
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec`; the array and the buffers
        // are borrowed mutably for the whole call.
        unsafe { self.run(e.build()) }
    }

    /// `pwritev` through the ring, of at most `IOV_MAX` buffers.
    pub(crate) fn writev(&self, fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>], offset: u64) -> i32 {
        let n = u32::try_from(bufs.len().min(IOV_MAX)).unwrap_or(1024);
        let e = opcode::Writev::new(Fd(fd.as_raw_fd()), bufs.as_ptr().cast(), n).offset(offset);
        // SAFETY: `IoSlice` is ABI-compatible with `iovec`; the array and the buffers are
        // borrowed for the whole call and the kernel only reads them.
        unsafe { self.run(e.build()) }
    }

    /// Runs one request whose memory the caller holds: submits `entry` and blocks until
    /// it completes; returns the kernel's result.
    ///
    /// # Safety
    ///
    /// `entry` may point only to memory that lives at least as long as this call and is
    /// not accessed by anyone else meanwhile (the caller's `&mut` / `&` borrows).
    pub(crate) unsafe fn run(&self, entry: squeue::Entry) -> i32 {
        let waiter = Arc::new(Waiter::default());
        let done = Box::new(WakeThread(waiter.clone()));
        let mut st = self.shared.lock();
        // SAFETY: the memory outlives this call (the caller's promise) and this call
        // returns only once the request has completed (`wait` below cannot return early).
        // Never deferred by a plug: this thread waits for it right away.
        let pushed = unsafe { self.shared.push(&mut st, entry, done) };
        // Waiting in the ring, this thread submits and waits in one `io_uring_enter`.
        let mine = self.shared.try_take(&mut st);
        drop(st);
        if mine {
            if !self.shared.reap_here() {
                self.shared.kick();
            }
        } else if pushed {
            self.shared.kick();
        }
        waiter.wait(&self.shared)
    }
}

impl Shared {
    /// A ring of `depth` entries (clamped to 1..=4096) whose completions signal an
    /// eventfd.
    pub(super) fn new(depth: usize) -> io::Result<Arc<Self>> {
        let depth = depth.clamp(1, 4096);
        let entries = u32::try_from(depth).unwrap_or(4096);
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .build(entries)?;
        let notify = Notify::new()?;
        ring.submitter().register_eventfd(notify.fd().as_raw_fd())?;
        Ok(Arc::new(Shared {
            ring,
            state: Mutex::new(State::default()),
            depth,
            notify,
        }))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `entry` with `done` as its completion (setting its `user_data`) and moves
    /// what fits into the submission queue; true when anything was pushed there.
    ///
    /// # Safety
    ///
    /// As for [`Uring::submit`].
    pub(super) unsafe fn push(
        &self,
        st: &mut State,
        entry: squeue::Entry,
        done: Box<dyn Complete>,
    ) -> bool {
        let idx = match st.free.pop() {
            Some(i) => i,
            None => {
                st.slots.push(None);
                st.slots.len() - 1
            }
        };
        if let Some(slot) = st.slots.get_mut(idx) {
            *slot = Some(done);
        }
        st.backlog.push_back(entry.user_data(idx as u64));
        self.fill(st)
    }

    /// Calls `f` with the `user_data` and result of each completion posted, taking them
    /// off the completion queue; `st` (the locked state) proves that no other handle to
    /// that queue exists.
    pub(super) fn take_completions(&self, st: &mut State, mut f: impl FnMut(&mut State, u64, i32)) {
        // SAFETY: every completion-queue access happens under the state lock, held by
        // the caller (`st`).
        for cqe in unsafe { self.ring.completion_shared() } {
            f(st, cqe.user_data(), cqe.result());
        }
    }

    /// Turns the kernel's eventfd signals on or off (`IORING_CQ_EVENTFD_DISABLED`, a
    /// flag of the completion queue: `_st` as for [`Shared::take_completions`]).
    pub(super) fn set_eventfd(&self, _st: &mut State, on: bool) {
        // SAFETY: as in `take_completions`.
        let cq = unsafe { self.ring.completion_shared() };
        if on {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
    }

    /// Moves backlog entries into the submission queue while there is room; true when
    /// any was pushed. Called with the state locked (the only submission-queue access).
    pub(super) fn fill(&self, st: &mut State) -> bool {
        let mut pushed = false;
        // SAFETY: the state lock is held, so no other submission-queue handle exists.
        let mut sq = unsafe { self.ring.submission_shared() };
        while st.in_flight < self.depth {
            let Some(e) = st.backlog.pop_front() else {
                break;
            };
            // SAFETY: the entry's memory is kept valid by its submitter (`Uring::submit`).
            if unsafe { sq.push(&e) }.is_err() {
                st.backlog.push_front(e);
                break;
            }
            st.in_flight += 1;
            pushed = true;
        }
        sq.sync();
        pushed
    }

    /// Tells the kernel about pushed entries (`io_uring_enter` without waiting); a
    /// failure leaves them queued for the completion thread's next `enter`.
    pub(super) fn kick(&self) {
        for _ in 0..1000 {
            match self.ring.submit() {
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::AGAIN.raw_os_error()) => {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => return,
            }
        }
    }
}

impl Drop for Uring {
    /// Waits for every request in flight (their memory must stay valid until then),
    /// then stops the completion thread.
    fn drop(&mut self) {
        if self.thread.is_none() {
            // An owned ring (`owned.rs`): its owner's requests complete here.
            self.finish_owned();
            return;
        }
        let mut st = self.shared.lock();
        st.stopping = true;
        st.backlog
            .push_back(opcode::Nop::new().build().user_data(STOP));
        let pushed = self.shared.fill(&mut st);
        drop(st);
        if pushed {
            self.shared.kick();
        }
        self.shared.notify.signal();
        // Dropped by a completion (the last handle held by what it woke): the thread
        // stops by itself once nothing is in flight.
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

/// A blocked thread waiting for one request ([`Uring::run`]).
#[derive(Default)]
struct Waiter {
    result: Mutex<Option<i32>>,
    cv: Condvar,
}

impl Waiter {
    /// The result: reaping `ring` on this thread while no other thread does, else
    /// waiting to be woken by whoever reaps.
    fn wait(&self, ring: &Shared) -> i32 {
        loop {
            let r = self.result.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = *r {
                return v;
            }
            drop(r);
            if ring.wait_in_ring() {
                continue;
            }
            let mut r = self.result.lock().unwrap_or_else(|e| e.into_inner());
            while r.is_none() {
                r = self.cv.wait(r).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

struct WakeThread(Arc<Waiter>);

impl Complete for WakeThread {
    fn complete(self: Box<Self>, result: i32) {
        *self.0.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        self.0.cv.notify_one();
    }
}

/// One part of an owned-buffer read ([`gather`]): `len` bytes of a file at `host` into
/// the buffer at `at`.
pub(crate) struct Piece {
    /// The ring to submit on.
    pub(crate) ring: Arc<Uring>,
    /// Keeps the file open until the read completes (a closed descriptor's number could
    /// name another file by then).
    pub(crate) file: Arc<crate::storage::FileStorage>,
    pub(crate) host: u64,
    pub(crate) at: usize,
    pub(crate) len: usize,
}

/// What [`gather`] calls when every piece has completed: the buffer back and each
/// piece's result (bytes read or `-errno`).
type GatherDone = Box<dyn FnOnce(IoBuf, Vec<i32>) + Send>;

/// An owned buffer being filled by several reads.
struct Gather {
    buf: Mutex<Option<IoBuf>>,
    results: Mutex<Vec<i32>>,
    left: AtomicUsize,
    done: Mutex<Option<GatherDone>>,
    _files: Vec<Arc<crate::storage::FileStorage>>,
}

struct PieceDone {
    g: Arc<Gather>,
    i: usize,
}

impl Complete for PieceDone {
    fn complete(self: Box<Self>, result: i32) {
        let g = &self.g;
        if let Some(r) = g
            .results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(self.i)
        {
            *r = result;
        }
        if g.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            finish(g);
        }
    }
}

fn finish(g: &Gather) {
    let buf = g.buf.lock().unwrap_or_else(|e| e.into_inner()).take();
    let results = std::mem::take(&mut *g.results.lock().unwrap_or_else(|e| e.into_inner()));
    let done = g.done.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let (Some(buf), Some(done)) = (buf, done) {
        done(buf, results);
    }
}

/// Reads every piece into `buf` at once (each on its own ring) without blocking; `done`
/// gets the buffer back when all have completed, on a completion thread (or here, when
/// there are no pieces). A piece outside the buffer fails with `-EINVAL` unsubmitted.
pub(crate) fn gather(mut buf: IoBuf, pieces: Vec<Piece>, done: GatherDone) {
    let base = buf.as_mut_slice().as_mut_ptr();
    let cap = buf.len();
    let g = Arc::new(Gather {
        buf: Mutex::new(None),
        results: Mutex::new(vec![
            -(rustix::io::Errno::INVAL.raw_os_error());
            pieces.len()
        ]),
        left: AtomicUsize::new(pieces.len() + 1),
        done: Mutex::new(Some(done)),
        _files: pieces.iter().map(|p| p.file.clone()).collect(),
    });
    // The buffer's heap memory does not move with the `IoBuf`; from here on only the
    // kernel touches it until `finish` takes it back.
    *g.buf.lock().unwrap_or_else(|e| e.into_inner()) = Some(buf);
    for (i, p) in pieces.into_iter().enumerate() {
        let inside = p.at.checked_add(p.len).is_some_and(|end| end <= cap);
        let len = u32::try_from(p.len).ok().filter(|&l| l <= MAX_IO);
        let (true, Some(len)) = (inside, len) else {
            g.left.fetch_sub(1, Ordering::AcqRel);
            continue;
        };
        let fd = Fd(p.file.file().as_raw_fd());
        let e = opcode::Read::new(fd, base.wrapping_add(p.at), len).offset(p.host);
        let c = Box::new(PieceDone { g: g.clone(), i });
        // SAFETY: the piece lies inside the buffer, which `g` owns (and so does the
        // completion) until every piece has completed; nothing else reaches the memory
        // meanwhile. `g` also keeps the file open.
        unsafe { p.ring.submit(e.build(), c) };
    }
    if g.left.fetch_sub(1, Ordering::AcqRel) == 1 {
        finish(&g);
    }
}
