//! Writes in flight for an `O_DIRECT` target: [`WriteBehind`] returns from a large
//! write once it has a copy of the bytes, and a few threads write the copies while the
//! caller goes on (reads and scans the next chunk, updates the format's metadata).
//!
//! Why: with `-t none` every write waits for the device, and the ordered writer of a
//! qcow2 (or vmdk, vhdx, ...) target issues one at a time, so the device idles while
//! the writer plans the next chunk or updates metadata, and it never sees more than one
//! request; fio on the benchmark's XFS image (docs/benchmarks.md) writes 2 MiB requests
//! about 1.5× faster with four in flight than with one.
//!
//! Copies of 2 MiB and more live on transparent huge pages where the kernel gives them
//! ([`crate::huge`]): a 2 MiB `O_DIRECT` write from one huge page reaches a loop
//! device as two requests instead of four.
//!
//! [`WriteBehind`] says what it promises.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use diskimg_blockio::{Error, Preallocation, Result, Storage, forward_storage};

use crate::pool::{Buf, Pool};

/// Writes shorter than this go through at once (metadata, partial clusters).
pub const MIN_BEHIND: usize = 64 << 10;
/// Writes longer than this go through at once (their copy would be too large).
pub const MAX_BEHIND: usize = 8 << 20;
/// [`WriteBehind::grow_ahead`] grows files in multiples of this.
const GROW_UNIT: u64 = 1 << 20;

/// A [`Storage`] with up to `depth` large writes in flight (and, with
/// [`WriteBehind::grow_ahead`], a file grown ahead of them).
///
/// What it promises is cache mode `none`'s (a volatile write cache, as qemu reports to
/// a guest): a completed write is seen by every later read through this storage, and
/// is durable after the next [`Storage::flush`], which first waits for every write in
/// flight. Writes that overlap one in flight wait for it, so they land in the order
/// they were made; reads wait for the writes they overlap. Everything that goes around
/// the writes (`set_len`, `write_zeroes`, `discard`, `preallocate`, `SEEK_DATA`,
/// `allocated_bytes`) waits for all of them first. [`Storage::len`] counts the writes
/// in flight. A write that fails in the background is reported by the next call (a
/// write, read or flush), and every later call fails the same way: the target is
/// broken, as after a failed `fsync` of a page-cached file.
///
/// Small writes (metadata) go through at once, after any overlapping large write. At
/// most `depth` large writes (and their copies) are outstanding.
#[derive(Debug)]
pub struct WriteBehind {
    shared: Arc<Shared>,
    /// The storage written to (also in `shared`): what only passes through.
    inner: Arc<dyn Storage>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Bytes the file is grown by ahead of the writes (0: never).
    grow: u64,
    /// The file's lengths while it is grown ahead.
    sizes: Mutex<Option<Sizes>>,
}

/// The lengths of a file grown ahead of its writes.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    /// What the file's length would be without growing ahead ([`Storage::len`]).
    logical: u64,
    /// The inner storage's length (at least `logical`).
    physical: u64,
}

#[derive(Debug)]
struct Shared {
    inner: Arc<dyn Storage>,
    state: Mutex<State>,
    /// A write finished (waiters for room, overlaps and drains).
    done: Condvar,
    /// A write was queued, or the storage is closing (the writer threads).
    work: Condvar,
    depth: usize,
    pool: Pool,
}

#[derive(Debug, Default)]
struct State {
    /// Copies waiting for a writer thread.
    queue: VecDeque<(u64, Buf)>,
    /// Byte ranges `(start, end)` queued or being written.
    pending: Vec<(u64, u64)>,
    /// The first background write that failed.
    error: Option<Error>,
    closing: bool,
    threads: usize,
}

impl State {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.pending.iter().any(|&(s, e)| s < end && start < e)
    }
}

impl WriteBehind {
    /// Wraps `inner` with up to `depth` (at least 1) large writes in flight.
    pub fn new(inner: Arc<dyn Storage>, depth: usize) -> Self {
        let depth = depth.clamp(1, 64);
        Self {
            inner: inner.clone(),
            shared: Arc::new(Shared {
                inner,
                state: Mutex::new(State::default()),
                done: Condvar::new(),
                work: Condvar::new(),
                depth,
                pool: Pool::new(depth),
            }),
            threads: Mutex::new(Vec::new()),
            grow: 0,
            sizes: Mutex::new(None),
        }
    }

    /// Grows the file `step` bytes (rounded to 1 MiB) ahead of writes past its end, and
    /// cuts it back to what was written at every flush and when dropped.
    ///
    /// Why: a file system may serialise `O_DIRECT` writes that start past the end of
    /// the file: XFS waits for every direct write in flight before one that starts
    /// beyond the current size (the size is updated when a write completes), so the
    /// appending writes of a growing image never overlap at the device. Writes inside
    /// the file's size run side by side. [`Storage::len`] and reads still see the
    /// written length; a crash may leave the file up to `step` bytes longer, a hole
    /// at its end.
    #[must_use]
    pub fn grow_ahead(mut self, step: u64) -> Self {
        self.grow = step.div_ceil(GROW_UNIT).saturating_mul(GROW_UNIT);
        self
    }

    /// Waits until no write is in flight; the first background error, if any.
    pub fn drain(&self) -> Result<()> {
        let sh = &self.shared;
        let mut st = sh.lock();
        while !st.pending.is_empty() {
            st = sh.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        match &st.error {
            Some(e) => Err(e.replay()),
            None => Ok(()),
        }
    }

    /// Before a write ending at `end` (with [`WriteBehind::grow_ahead`]): counts it in
    /// the written length, and grows the file when the write reaches past it.
    fn grow_for(&self, end: u64) -> Result<()> {
        if self.grow == 0 {
            return Ok(());
        }
        let mut g = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = match *g {
            Some(s) => s,
            None => {
                let n = self.shared.inner.len()?;
                Sizes {
                    logical: n,
                    physical: n,
                }
            }
        };
        if end > s.physical {
            let want = end
                .checked_add(self.grow)
                .map(|v| v / GROW_UNIT * GROW_UNIT)
                .ok_or(Error::invalid("write past the largest offset"))?;
            // Writes in flight lie inside the old length; growing does not move them.
            self.shared.inner.set_len(want)?;
            s.physical = want;
        }
        s.logical = s.logical.max(end);
        *g = Some(s);
        Ok(())
    }

    /// Waits for the writes in flight and cuts a file grown ahead back to its written
    /// length; the next write past it reads the lengths afresh.
    fn settle(&self) -> Result<()> {
        self.drain()?;
        let mut g = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = g.take()
            && s.physical > s.logical
        {
            self.shared.inner.set_len(s.logical)?;
        }
        Ok(())
    }

    /// The written length of a file grown ahead (`None`: not grown).
    fn logical_len(&self) -> Option<u64> {
        let g = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        g.map(|s| s.logical)
    }

    /// Queues a copy of `buf` for a writer thread (starting one when fewer than `depth`
    /// run); false when no thread could be started (the caller writes itself).
    fn queue(&self, buf: &[u8], offset: u64, end: u64) -> Result<bool> {
        let sh = &self.shared;
        let mut st = sh.wait(|s| s.pending.len() < sh.depth && !s.overlaps(offset, end))?;
        if st.threads < sh.depth && st.threads <= st.pending.len() {
            let worker = sh.clone();
            let spawned = std::thread::Builder::new()
                .name("write-behind".into())
                .spawn(move || worker.write_loop());
            match spawned {
                Ok(h) => {
                    st.threads += 1;
                    self.threads
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(h);
                }
                Err(_) if st.threads == 0 => return Ok(false),
                Err(_) => {}
            }
        }
        // Reserve the range before copying outside the lock: later overlapping calls
        // wait for it from now on.
        st.pending.push((offset, end));
        drop(st);
        let copy = sh.pool.copy_of(buf);
        let mut st = sh.lock();
        match copy {
            Ok(data) => {
                st.queue.push_back((offset, data));
                sh.work.notify_one();
                Ok(true)
            }
            Err(e) => {
                sh.finish(&mut st, offset, end);
                Err(e)
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (on `done`) until `ready`; fails with the background error once there is one.
    fn wait(&self, ready: impl Fn(&State) -> bool) -> Result<MutexGuard<'_, State>> {
        let mut st = self.lock();
        loop {
            if let Some(e) = &st.error {
                return Err(e.replay());
            }
            if ready(&st) {
                return Ok(st);
            }
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The range `offset..end` is no longer in flight.
    fn finish(&self, st: &mut State, offset: u64, end: u64) {
        if let Some(i) = st.pending.iter().position(|&r| r == (offset, end)) {
            st.pending.swap_remove(i);
        }
        self.done.notify_all();
    }

    /// A writer thread: writes queued copies until the storage closes.
    fn write_loop(&self) {
        let mut st = self.lock();
        loop {
            let Some((offset, data)) = st.queue.pop_front() else {
                if st.closing {
                    return;
                }
                st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            drop(st);
            let end = offset + data.len() as u64;
            let guard = Unfinished(self, offset, end);
            let res = self.inner.write_all_at(&data, offset);
            std::mem::forget(guard);
            self.pool.put(data);
            st = self.lock();
            if let Err(e) = res {
                st.error.get_or_insert(e);
            }
            self.finish(&mut st, offset, end);
        }
    }
}

/// A write a writer thread started: if the inner storage panics, the range (and every
/// queued one) is given up with an error instead of being waited for forever.
struct Unfinished<'a>(&'a Shared, u64, u64);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        let e = std::io::Error::other("write-behind thread panicked");
        st.error.get_or_insert(Error::io(
            format!("could not write at offset {}", self.1),
            e,
        ));
        self.0.finish(&mut st, self.1, self.2);
        // The storage is broken from now on: nothing queued is waited for either.
        while let Some((offset, data)) = st.queue.pop_front() {
            self.0.finish(&mut st, offset, offset + data.len() as u64);
        }
    }
}

impl Drop for WriteBehind {
    /// Writes what is in flight (as a close without flush: written, not durable), then
    /// stops the writer threads.
    fn drop(&mut self) {
        let _ = self.settle();
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        let threads = std::mem::take(self.threads.get_mut().unwrap_or_else(|p| p.into_inner()));
        for h in threads {
            let _ = h.join();
        }
    }
}

impl Storage for WriteBehind {
    forward_storage!(inner: is_read_only, discard_zeroes, start_writeback, debug_event);
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if self.logical_len().is_some_and(|n| end > n) {
            // The hole a file grown ahead ends with is not there to read.
            return Err(Error::io(
                format!("could not read {} bytes at offset {offset}", buf.len()),
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        let idle = {
            let st = self.shared.wait(|s| !s.overlaps(offset, end))?;
            st.pending.is_empty()
        };
        match self.shared.inner.read_exact_at(buf, offset) {
            // Past the end of the file as it is now, but a write in flight may extend
            // it: read again once they are all done.
            Err(_) if !idle => {
                self.drain()?;
                self.shared.inner.read_exact_at(buf, offset)
            }
            r => r,
        }
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(Error::invalid("write past the largest offset"))?;
        self.grow_for(end)?;
        if (MIN_BEHIND..=MAX_BEHIND).contains(&buf.len()) && self.queue(buf, offset, end)? {
            return Ok(());
        }
        drop(self.shared.wait(|s| !s.overlaps(offset, end))?);
        self.shared.inner.write_all_at(buf, offset)
    }
    /// The inner length, or the end of the furthest write in flight (the written
    /// length of a file grown ahead).
    fn len(&self) -> Result<u64> {
        if let Some(n) = self.logical_len() {
            return Ok(n);
        }
        let queued = self.shared.lock().pending.iter().map(|r| r.1).max();
        Ok(self.shared.inner.len()?.max(queued.unwrap_or(0)))
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.settle()?;
        self.shared.inner.set_len(len)
    }
    /// Waits for the writes in flight (and cuts a file grown ahead back to its written
    /// length), then flushes.
    fn flush(&self) -> Result<()> {
        self.settle()?;
        self.shared.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.settle()?;
        self.shared.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.settle()?;
        self.shared.inner.discard(offset, len)
    }
    fn preallocate(&self, offset: u64, len: u64, mode: Preallocation) -> Result<()> {
        self.settle()?;
        self.shared.inner.preallocate(offset, len, mode)
    }
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.settle()?;
        self.shared.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> Result<u64> {
        self.settle()?;
        self.shared.inner.next_hole(offset)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.settle()?;
        self.shared.inner.allocated_bytes()
    }
}
