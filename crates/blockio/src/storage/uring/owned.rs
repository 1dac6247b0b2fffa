//! A ring owned by one thread ([`Uring::owned`]): no completion thread; its owner
//! submits detached reads ([`Uring::readv_detached`]) and reaps their completions
//! itself, when the ring's eventfd ([`Uring::event_fd`]) becomes readable in its own
//! event loop ([`Uring::reap`]) or by waiting in the ring ([`Uring::wait`]).
//!
//! This is the shape of a vhost-user-blk queue thread (`diskimg-serve`): it pops a read,
//! submits it straight into guest memory, goes back to its `epoll` wait, and completes
//! the read when the kernel posts it. A read on a regular file completes as task work
//! of the thread that submitted it, so that thread runs it and reaps in one wake-up;
//! a completion thread would add a hop per request (`reap.rs`).
//!
//! # Why this module uses `unsafe`
//!
//! [`Uring::readv_detached`] hands the kernel memory and a file descriptor that the
//! borrow checker cannot follow past the call: its caller promises that both stay
//! valid, and the memory untouched, until the completion has run. Its buffers are
//! [`RawBuf`]s (addresses, as `struct iovec` has them) rather than `IoSliceMut`s, so
//! that no Rust reference to memory another party may write (a guest's) is ever made.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};

use io_uring::{opcode, types::Fd};

use super::reap::Done;
use super::ring::{Complete, IOV_MAX, Shared, Uring};

/// One buffer of a detached read: `len` bytes at address `base`, laid out as
/// `struct iovec` (readv(2)).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawBuf {
    base: *mut u8,
    len: usize,
}

// SAFETY: a `RawBuf` is an address and a length; nothing is read or written through it
// here. Whoever submits it vouches for the memory (`Uring::readv_detached`).
unsafe impl Send for RawBuf {}

impl RawBuf {
    /// `len` bytes at `base`.
    pub fn new(base: *mut u8, len: usize) -> Self {
        Self { base, len }
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The completion of a detached read: owns its iovec array until the kernel is done.
struct Detached {
    _bufs: Box<[RawBuf]>,
    done: Box<dyn FnOnce(i32) + Send>,
}

impl Complete for Detached {
    fn complete(self: Box<Self>, result: i32) {
        (self.done)(result);
    }
}

impl Uring {
    /// A ring of `depth` entries without a completion thread: its owner reaps it
    /// ([`Uring::reap`], [`Uring::wait`]). More requests than `depth` wait in a backlog
    /// that reaping refills from. Dropping it waits for every request in flight (on the
    /// dropping thread, which runs their completions). Meant for detached reads
    /// ([`Uring::readv_detached`]); blocking storage I/O on it works only while its
    /// caller is the one reaping.
    pub fn owned(depth: usize) -> io::Result<Self> {
        Ok(Self {
            shared: Shared::new(depth)?,
            thread: None,
        })
    }

    /// The eventfd the kernel signals as it posts completions (non-blocking): an
    /// owner's event loop watches it and calls [`Uring::reap`] when it is readable.
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.shared.notify.fd().as_fd()
    }

    /// Requests submitted and not yet reaped (the backlog included).
    pub fn in_flight(&self) -> usize {
        let st = self.shared.lock();
        st.in_flight + st.backlog.len()
    }

    /// Submits `bufs` as one `preadv(2)` of `fd` at `offset`, without waiting; `done`
    /// gets the kernel's result (bytes read, or `-errno`) on the thread that reaps it.
    /// At most 1024 buffers are read (`IOV_MAX`). Under a [`Plug`](crate::Plug) the
    /// request waits for the plug's one `io_uring_enter`.
    ///
    /// # Safety
    ///
    /// `fd` must stay open, and every buffer of `bufs` valid for writes and not read or
    /// written by anyone else (no Rust reference to it may exist), until `done` has been
    /// called or dropped.
    pub unsafe fn readv_detached(
        &self,
        fd: RawFd,
        bufs: Box<[RawBuf]>,
        offset: u64,
        done: Box<dyn FnOnce(i32) + Send>,
    ) {
        let n = u32::try_from(bufs.len().min(IOV_MAX)).unwrap_or(1);
        // `RawBuf` is laid out as `struct iovec`; the boxed array does not move when
        // the box does.
        let e = opcode::Readv::new(Fd(fd), bufs.as_ptr().cast(), n).offset(offset);
        let c = Box::new(Detached { _bufs: bufs, done });
        let mut st = self.shared.lock();
        // SAFETY: the caller's promise for `fd` and the buffers; the iovec array is
        // owned by the completion until it runs.
        let pushed = unsafe { self.shared.push(&mut st, e.build(), c) };
        drop(st);
        if pushed && !super::plug::defer(&self.shared) {
            self.shared.kick();
        }
    }

    /// Runs every completion posted so far on the calling thread, without waiting, and
    /// moves backlog entries into the freed room; returns how many ran.
    pub fn reap(&self) -> usize {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(self.shared.notify.fd(), &mut buf);
        self.run_posted()
    }

    /// Waits in the ring until at least one request completes (submitting what is
    /// queued in the same call) and runs what completed, as [`Uring::reap`]; returns at
    /// once with 0 when nothing is in flight.
    pub fn wait(&self) -> usize {
        if self.in_flight() == 0 {
            return 0;
        }
        loop {
            let r = self.shared.ring.submit_and_wait(1);
            let ran = self.reap();
            if ran > 0 || r.is_err_and(|e| e.kind() != io::ErrorKind::Interrupted) {
                return ran;
            }
        }
    }

    fn run_posted(&self) -> usize {
        let mut done = Done::new();
        let mut st = self.shared.lock();
        self.shared.drain(&mut st, &mut done);
        let pushed = self.shared.fill(&mut st);
        drop(st);
        if pushed {
            self.shared.kick();
        }
        let n = done.len();
        for (c, res) in done.drain(..) {
            c.complete(res);
        }
        n
    }

    /// [`Drop`] of an owned ring: reaps until nothing is in flight (the memory of each
    /// request must stay valid until it completes).
    pub(super) fn finish_owned(&self) {
        while self.in_flight() > 0 {
            self.wait();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Mutex};

    use super::*;

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, std::fs::File) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(bytes).unwrap();
        let f = std::fs::File::open(t.path()).unwrap();
        (t, f)
    }

    #[test]
    fn detached_reads_complete_on_reap_wait_and_drop() {
        let data: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
        let (_t, f) = file_of(&data);
        let ring = Uring::owned(2).unwrap();
        let results = Arc::new(Mutex::new(Vec::new()));
        // Four reads on a ring of two entries: two wait in the backlog.
        let mut bufs: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; 8192]).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            let (head, tail) = b.split_at_mut(4096);
            let raw = vec![
                RawBuf::new(head.as_mut_ptr(), head.len()),
                RawBuf::new(tail.as_mut_ptr(), tail.len()),
            ];
            let r = results.clone();
            let done = Box::new(move |res: i32| r.lock().unwrap().push((i, res)));
            // SAFETY: `bufs` outlives the ring's requests: they are all reaped below
            // before it is read or dropped.
            unsafe { ring.readv_detached(f.as_raw_fd(), raw.into(), (i * 8192) as u64, done) };
        }
        assert_eq!(ring.in_flight(), 4);
        while ring.in_flight() > 2 {
            ring.wait();
        }
        ring.wait();
        drop(ring); // reaps the rest
        let mut got = results.lock().unwrap().clone();
        got.sort_unstable();
        assert_eq!(got, vec![(0, 8192), (1, 8192), (2, 8192), (3, 8192)]);
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(b[..], data[i * 8192..(i + 1) * 8192]);
        }
    }

    /// Submits a read of `buf.len()` bytes of `f` at 0 into `buf`; the kernel's result
    /// lands in what it returns once reaped.
    ///
    /// # Safety
    ///
    /// `buf` must not be touched or dropped until the read is reaped.
    unsafe fn read_at_0(
        ring: &Uring,
        f: &std::fs::File,
        buf: &mut [u8],
    ) -> Arc<Mutex<Option<i32>>> {
        let res = Arc::new(Mutex::new(None));
        let r = res.clone();
        let raw = vec![RawBuf::new(buf.as_mut_ptr(), buf.len())];
        let done = Box::new(move |n| *r.lock().unwrap() = Some(n));
        // SAFETY: the caller's promise for `buf`; `f` outlives the test's ring.
        unsafe { ring.readv_detached(f.as_raw_fd(), raw.into(), 0, done) };
        res
    }

    #[test]
    fn the_eventfd_signals_and_reap_does_not_block() {
        let (_t, f) = file_of(&[7u8; 4096]);
        let ring = Uring::owned(4).unwrap();
        assert_eq!(ring.reap(), 0, "nothing in flight: nothing to run, no wait");
        assert_eq!(ring.wait(), 0);
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is not touched until the request is reaped below.
        let res = unsafe { read_at_0(&ring, &f, &mut buf) };
        let efd = ring.event_fd();
        let mut fds = [rustix::event::PollFd::new(
            &efd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: 5,
            tv_nsec: 0,
        };
        assert_eq!(
            rustix::event::poll(&mut fds, Some(&ts)).unwrap(),
            1,
            "the eventfd became readable"
        );
        while ring.reap() == 0 {}
        assert_eq!(*res.lock().unwrap(), Some(4096));
        assert_eq!(buf, vec![7u8; 4096]);
        // Past the end: a short read, reported as such.
        let mut tail = vec![0u8; 8192];
        // SAFETY: as above.
        let res2 = unsafe { read_at_0(&ring, &f, &mut tail) };
        ring.wait();
        assert_eq!(*res2.lock().unwrap(), Some(4096));
    }
}
