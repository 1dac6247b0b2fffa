//! Plain reads on the queue's own io_uring: the queue's thread submits a read straight
//! into guest memory and goes back to its event loop; the kernel posts the completion
//! on a ring that only this queue uses, whose eventfd wakes the same thread, which
//! completes the request (`VhostConfig::ring_depth`).
//!
//! The worker path costs each request two thread hand-offs (queue thread → worker →
//! driver) and a blocked worker per request at the disk; with `O_DIRECT` at queue depth
//! 16 both servers were bound by those wake-ups, not by the disk or the CPU
//! (docs/benchmarks.md, "Session 13"). Here a request costs no hand-off at all: the
//! read completes as task work of the thread that submitted it, which then reaps it
//! in the same wake-up. On an idle queue (depth 1) the thread waits in the ring for
//! the read it just submitted instead of going back to `epoll`.
//!
//! A request takes this path when it is a plain read ([`Plain`]) whose status byte is
//! writable and whose every byte the device maps to a plain host run
//! ([`Mapping::Host`]) of a storage that offers a plain read of it
//! ([`Storage::plain_read`](diskimg_blockio::Storage::plain_read): a host file, with
//! `O_DIRECT` only where the guest's buffers meet its alignment), and when the device
//! can tell whether those runs stay the guest data's home ([`BlockDevice::host_epoch`]).
//! Anything else (zeroes, backing data that is not a plain run, compressed or encrypted
//! clusters, writes, flushes, a malformed chain) takes the worker path as before.
//!
//! The runs are read after the walk that found them returned, so a host cluster could
//! be freed and reused for other guest data before the kernel reads it (a discard or a
//! copy-on-write on another queue). The device's host epoch is taken before the walk
//! and compared when the last run has completed: if it moved, or any run failed or came
//! back short, the request is executed again on the worker path, whose result the
//! guest gets. Guest memory is handed to the kernel as addresses ([`RawBuf`]); no Rust
//! reference to it is made here.
//!
//! # Why this module uses `unsafe`
//!
//! [`Uring::readv_detached`] is an `unsafe fn`: the descriptor must stay open and the
//! buffers mapped until the completion runs. Both hold by ownership: the completion
//! owns the request ([`RingRead`]), which owns the descriptor chain (and so the guard
//! that keeps the guest memory mapped, as `guest.rs` relies on) and the export (and so
//! the device whose storage owns the descriptor). A ring's requests all
//! complete before it is dropped (it waits), and [`BlkBackend::quiesce`] reaps the rings
//! when the frontend has gone.

#![allow(unsafe_code)]

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use diskimg_blockio::{Mapping, RawBuf, Uring};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory};

use super::fast::Plain;
use super::request::{S_OK, T_IN};
use crate::export::Export;

/// Most buffers in one host read (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// What completes a request read on the ring (the queue's used ring and notification
/// live with the backend).
pub(super) trait Finisher<M>: Send + Sync + 'static {
    /// The read succeeded and its status byte is written: put `chain` in the used ring
    /// with used length `len`.
    fn done(&self, chain: &DescriptorChain<M>, len: u32);
    /// Execute `chain` again on the worker path (which completes it).
    fn again(&self, chain: DescriptorChain<M>);
}

/// A read in flight on a queue's ring: completed when its last run is. It owns the
/// chain (and so the guard keeping guest memory mapped) and the export (and so the
/// device whose storages own the descriptors read).
struct RingRead<M, F> {
    export: Arc<Export>,
    chain: DescriptorChain<M>,
    plain: Plain,
    /// The device's host epoch before the walk.
    epoch: u64,
    /// Runs not yet completed.
    left: AtomicUsize,
    /// A run failed or came back short.
    failed: AtomicBool,
    finish: F,
}

impl<M, F> RingRead<M, F>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
    F: Finisher<M>,
{
    /// One run's kernel result (`want` bytes expected).
    fn run_done(&self, res: i32, want: usize) {
        if usize::try_from(res).ok() != Some(want) {
            self.failed.store(true, Ordering::Release);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let unmoved = self.export.device().host_epoch() == Some(self.epoch);
        if self.failed.load(Ordering::Acquire) || !unmoved {
            self.finish.again(self.chain.clone());
            return;
        }
        let len = self.plain.complete(self.chain.memory(), S_OK);
        self.finish.done(&self.chain, len);
    }
}

/// One host read of a request: `bufs` (guest memory) from `fd` at `host`.
struct HostRead {
    fd: std::os::fd::RawFd,
    host: u64,
    bufs: Vec<RawBuf>,
    len: usize,
}

/// Submits `chain` to `ring` when it can take this path (module docs), to be completed
/// by `finish()`; false, having done nothing, when it must take the worker path.
pub(super) fn try_submit<M, F>(
    export: &Arc<Export>,
    ring: &Uring,
    chain: &DescriptorChain<M>,
    finish: impl FnOnce() -> F,
) -> bool
where
    M: Deref + Clone + Send + Sync + 'static,
    M::Target: GuestMemory + Sized,
    F: Finisher<M>,
{
    // The header's type first: a write is not parsed twice (here and on the workers).
    let ty = chain
        .clone()
        .next()
        .and_then(|h| chain.memory().read_obj::<u32>(h.addr()).ok())
        .map(u32::from_le);
    if ty != Some(T_IN) {
        return false;
    }
    let Some(plain) = Plain::parse(export, chain).filter(|p| p.read) else {
        return false;
    };
    let mem = chain.memory();
    if !plain.status_writable(mem) {
        return false;
    }
    let Some(epoch) = export.device().host_epoch() else {
        return false;
    };
    let Some(spans) = plain.slices(mem, 0..plain.len).map(|s| {
        s.iter()
            .filter(|s| !s.is_empty())
            .map(|s| (s.ptr_guard_mut().as_ptr() as usize, s.len()))
            .collect::<Vec<_>>()
    }) else {
        return false;
    };
    let Some(reads) = plan(export, &plain, &spans) else {
        return false;
    };
    let req = Arc::new(RingRead {
        export: export.clone(),
        chain: chain.clone(),
        plain,
        epoch,
        left: AtomicUsize::new(reads.len()),
        failed: AtomicBool::new(false),
        finish: finish(),
    });
    for r in reads {
        let (me, want) = (req.clone(), r.len);
        let done = Box::new(move |res: i32| me.run_done(res, want));
        // SAFETY: `done` owns the request, and so the chain (whose memory guard keeps
        // `bufs` mapped) and the export (whose device owns the storage and its
        // descriptor), until it has run (module docs).
        unsafe { ring.readv_detached(r.fd, r.bufs.into(), r.host, done) };
    }
    true
}

/// The host reads of `plain`'s data: one per host run the device maps it to, each
/// with the guest buffers (`spans`: address, length) covering its bytes; `None` when
/// any byte is not in a plain host run or a buffer misses the file's alignment.
fn plan(export: &Export, plain: &Plain, spans: &[(usize, usize)]) -> Option<Vec<HostRead>> {
    let mut reads: Vec<HostRead> = Vec::new();
    let mut refuse = |_: &dyn diskimg_blockio::Layout, pos: u64, n: u64, m: Mapping<'_>| {
        let Mapping::Host(run) = m else {
            return Err(diskimg_blockio::Error::invalid("not a plain host run"));
        };
        let p = run
            .storage
            .plain_read(run.offset, n)
            .ok_or_else(|| diskimg_blockio::Error::invalid("no plain read"))?;
        let at = pos
            .checked_sub(plain.offset)
            .and_then(|a| usize::try_from(a).ok());
        let n = usize::try_from(n).ok();
        let bufs = at
            .zip(n)
            .and_then(|(at, n)| buffers(spans, at, n))
            .filter(|b| b.len() <= IOV_MAX && b.iter().all(|b| p.fits(b.0, b.1)))
            .ok_or_else(|| diskimg_blockio::Error::invalid("guest buffers"))?;
        use std::os::fd::AsRawFd;
        reads.push(HostRead {
            fd: p.fd.as_raw_fd(),
            host: run.offset,
            bufs: bufs
                .iter()
                .map(|&(a, l)| RawBuf::new(a as *mut u8, l))
                .collect(),
            len: bufs.iter().map(|b| b.1).sum(),
        });
        Ok(())
    };
    let walked = export
        .device()
        .walk_runs(plain.offset, plain.len as u64, &mut refuse);
    (matches!(walked, Ok(true)) && !reads.is_empty()).then_some(reads)
}

/// The parts of `spans` (consecutive buffers: address, length) holding data bytes
/// `at..at + n`; `None` when they end first.
fn buffers(spans: &[(usize, usize)], at: usize, n: usize) -> Option<Vec<(usize, usize)>> {
    let end = at.checked_add(n)?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for &(addr, len) in spans {
        let (s, e) = (pos, pos.checked_add(len)?);
        pos = e;
        if e <= at {
            continue;
        }
        if s >= end {
            break;
        }
        let from = at.max(s) - s;
        let to = end.min(e) - s;
        out.push((addr.checked_add(from)?, to - from));
    }
    (out.iter().map(|b| b.1).sum::<usize>() == n).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::buffers;

    #[test]
    fn buffers_cover_exactly_the_run() {
        let spans = [(1000, 10), (5000, 20), (9000, 5)];
        assert_eq!(buffers(&spans, 0, 35), Some(spans.to_vec()));
        assert_eq!(buffers(&spans, 5, 10), Some(vec![(1005, 5), (5000, 5)]));
        assert_eq!(buffers(&spans, 30, 5), Some(vec![(9000, 5)]));
        assert_eq!(buffers(&spans, 12, 3), Some(vec![(5002, 3)]));
        assert_eq!(buffers(&spans, 30, 6), None, "past the buffers");
        assert_eq!(buffers(&spans, usize::MAX, 2), None);
    }
}
