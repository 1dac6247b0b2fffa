//! Allocating writes that drop the metadata lock during their data write (issue 17), as
//! qemu's qcow2 does with its cluster allocation dependencies, on storages that bypass
//! the page cache (`Storage::bypasses_cache`: `O_DIRECT`, io_uring), where a data write
//! takes the device's time and two threads' writes overlap in the device.
//!
//! A guest write inside one cluster that reads as zeroes or as the backing file
//! (unallocated, or a zero cluster without a host cluster), on an image with standard L2
//! entries and no encryption, is done in three steps:
//! 1. under the exclusive lock: the L2 table is made ready, a host cluster is allocated
//!    and refcounted (as before), the cluster's bytes are prepared (copy-on-write reads),
//!    and the guest cluster is registered *in flight* ([`InFlight`]);
//! 2. without the lock: the data is written;
//! 3. under the exclusive lock again: the L2 entry is recorded (deferred to the next
//!    flush as every allocation's, with the same ordering flush), and the registration
//!    ends.
//!
//! Writes that touch a cluster in flight wait until its allocation is linked (qemu's
//! `handle_dependencies`), then look again; so allocations of the same cluster never
//! race, while allocations of neighbouring clusters write their data at once. Every other
//! user of the exclusive lock ([`Qcow2Device::lock`]: discards, zero writes, flushes,
//! snapshots, resize, check, close, every other write) waits until no allocation is in
//! flight, and no new one registers while it waits (no starvation). The storage sees the
//! same operations in the same order as when the lock was held throughout (refcounts,
//! data, then the L2 entry after an ordering flush), so crash consistency is unchanged.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use diskimg_blockio::Result;

use crate::device::Qcow2Device;
use crate::disk::idx;
use crate::disk::table::{OFLAG_COMPRESSED, OFLAG_COPIED, Sub, classify};
use crate::encryption::write_data;
use crate::engine::deferred::L2Update;
use crate::errors::internal;
use crate::write::{Pending, ensure_l2, host_reads_zero, needs_ordering, new_clusters, reads_zero};

/// Guest clusters whose allocating write is between its two locked steps.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    state: Mutex<State>,
    cv: Condvar,
    /// `state.ranges.len()`, readable without the mutex.
    count: AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    ranges: Vec<Range<u64>>,
    /// Threads waiting for the exclusive lock with nothing in flight.
    blockers: usize,
}

impl InFlight {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nothing in flight (exact while the metadata lock is held exclusively: only
    /// holders of it register).
    pub(crate) fn idle(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Registers guest range `r` (metadata lock held exclusively) until the returned
    /// guard drops; `None` when a thread waits for the lock with nothing in flight (the
    /// caller then keeps the lock).
    fn register(&self, r: Range<u64>) -> Option<Registered<'_>> {
        let mut s = self.state();
        if s.blockers > 0 {
            return None;
        }
        s.ranges.push(r.clone());
        self.count.store(s.ranges.len(), Ordering::Release);
        Some(Registered(self, r))
    }

    fn unregister(&self, r: &Range<u64>) {
        let mut s = self.state();
        if let Some(k) = s.ranges.iter().position(|x| x == r) {
            s.ranges.swap_remove(k);
        }
        self.count.store(s.ranges.len(), Ordering::Release);
        self.cv.notify_all();
    }

    /// Whether an allocation in flight overlaps guest range `r`.
    fn overlaps(&self, r: &Range<u64>) -> bool {
        self.state()
            .ranges
            .iter()
            .any(|x| x.start < r.end && r.start < x.end)
    }

    /// Waits until no allocation in flight overlaps `r`.
    fn wait_clear(&self, r: &Range<u64>) {
        let s = self.state();
        let overlap = |s: &mut State| s.ranges.iter().any(|x| x.start < r.end && r.start < x.end);
        drop(
            self.cv
                .wait_while(s, overlap)
                .unwrap_or_else(|e| e.into_inner()),
        );
    }

    /// Stops new registrations and waits until nothing is in flight; call
    /// [`InFlight::unblock`] once the metadata lock is held.
    pub(crate) fn block_and_drain(&self) {
        let mut s = self.state();
        s.blockers += 1;
        drop(
            self.cv
                .wait_while(s, |s| !s.ranges.is_empty())
                .unwrap_or_else(|e| e.into_inner()),
        );
    }

    pub(crate) fn unblock(&self) {
        let mut s = self.state();
        s.blockers = s.blockers.saturating_sub(1);
    }
}

/// An allocation in flight; dropping it (also on an error or a panic) ends it.
struct Registered<'a>(&'a InFlight, Range<u64>);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.unregister(&self.1);
    }
}

/// What [`alloc_unlocked`] did.
pub(crate) enum Outcome {
    /// The write is done.
    Done,
    /// An allocation of an overlapping cluster was in flight and has finished: look at
    /// the mapping again.
    Retry,
    /// The write needs the exclusive path.
    Fallback,
}

/// Step 1–3 of the module docs for `buf` at guest `off`, when it qualifies.
pub(crate) fn alloc_unlocked(dev: &Qcow2Device, buf: &[u8], off: u64) -> Result<Outcome> {
    let Some(last) = (buf.len() as u64).checked_sub(1).map(|l| off + l) else {
        return Ok(Outcome::Fallback);
    };
    // Through the page cache the data write is a copy of microseconds: dropping and
    // retaking the lock around it costs more than the overlap gains (docs/benchmarks.md,
    // session 6), so only storages that bypass the cache take this path.
    if dev.crypt.is_some() || !dev.data.as_ref().unwrap_or(&dev.file).bypasses_cache() {
        return Ok(Outcome::Fallback);
    }
    let mut m = dev.lock_raw();
    let cs = m.cs();
    if m.h().extended_l2() || off / cs != last / cs || m.corruption_signalled() {
        return Ok(Outcome::Fallback);
    }
    let cstart = off - off % cs;
    let cluster = cstart..cstart + cs;
    if dev.inflight.overlaps(&cluster) {
        drop(m);
        dev.inflight.wait_clear(&cluster);
        return Ok(Outcome::Retry);
    }
    let (e, _, l2_off) = m.l2_entry(off)?;
    if e & OFLAG_COMPRESSED != 0 {
        return Ok(Outcome::Fallback);
    }
    // (A shared L2 table is copied by `ensure_l2` below, under the lock.)
    let kind = classify(m.h(), e, 0, 0, l2_off)?;
    if !matches!(kind, Sub::Unalloc | Sub::Zero) {
        return Ok(Outcome::Fallback);
    }
    let l1i = off / m.h().l1_coverage();
    let l2 = ensure_l2(&mut m, l1i)?;
    let was_zero = reads_zero(dev, kind, cstart);
    let (host, reserved) = new_clusters(&mut m, cstart, 1)?;
    let in_off = off - cstart;
    let (data, at): (std::borrow::Cow<'_, [u8]>, u64) = if buf.len() as u64 == cs {
        (buf.into(), 0)
    } else if was_zero && host_reads_zero(dev, &m, host, reserved)? {
        (buf.into(), in_off)
    } else {
        let mut full = vec![0u8; idx(cs)];
        if kind == Sub::Unalloc {
            dev.read_locked(&mut m, &mut full, cstart)?;
        }
        let dst = full.get_mut(idx(in_off)..idx(in_off) + buf.len());
        dst.ok_or(internal("write range"))?.copy_from_slice(buf);
        (full.into(), 0)
    };
    let mut p = Pending::default();
    let i = (off / cs) % m.h().l2_entries();
    p.l2.push(L2Update::new(l2, i, host | OFLAG_COPIED, 0));
    p.flush = needs_ordering(dev, reserved, was_zero);
    let store = m.data_store().clone();
    let Some(registered) = dev.inflight.register(cluster) else {
        // Someone waits for the lock: write and link with it held, as before.
        write_data(None, store.as_ref(), &data, host + at, cstart + at)?;
        m.defer(p.l2, p.unref, p.flush)?;
        return Ok(Outcome::Done);
    };
    drop(m);
    let written = write_data(None, store.as_ref(), &data, host + at, cstart + at);
    let mut m = dev.lock_raw();
    let linked = written.and_then(|()| m.defer(p.l2, p.unref, p.flush));
    // Ends the registration with the lock still held: the entry is in place first.
    drop(registered);
    drop(m);
    linked.map(|()| Outcome::Done)
}
