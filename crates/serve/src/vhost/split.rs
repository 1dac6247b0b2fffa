//! One large read or write executed as pieces on several threads at once.
//!
//! qemu-storage-daemon advertises 4 KiB segments and at most 126 of them, so the guest
//! splits a 1 MiB request into two or three that its thread pool runs side by side;
//! diskimg takes the request whole (no segment limits, fewer requests for the guest) and
//! splits it itself, but only at queue depth 1 (the queue idle, and the last batches
//! lone requests as well: the other threads have nothing else to do; at a deeper queue
//! they are busy with other requests and a split only adds hand-offs). Each piece moves its own byte
//! range of the request's data straight between guest memory and the image; whichever
//! piece finishes last writes the status byte (an error if any piece failed), so the
//! request completes exactly once.

use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemory};

use super::guest;
use super::request::{
    HEADER, S_IOERR, S_OK, S_UNSUPP, Status, T_IN, T_OUT, data_slices, header, in_range,
};
use crate::export::{Export, Fault};

/// Piece boundaries fall on multiples of this many bytes of the request's data (a
/// qcow2 cluster by default, so no cluster is shared by two pieces).
const ALIGN: usize = 64 << 10;

/// A read (`VIRTIO_BLK_T_IN`) or write (`VIRTIO_BLK_T_OUT`) request planned as pieces.
pub(crate) struct Split<M>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    chain: DescriptorChain<M>,
    read: bool,
    /// Image offset of the request's first byte.
    offset: u64,
    /// Data bytes of the request.
    len: usize,
    /// Bytes per piece (the last may be shorter).
    piece: usize,
    /// The status byte so far: `S_OK` until a piece fails.
    status: AtomicU8,
    /// Pieces not yet finished.
    left: AtomicUsize,
}

impl<M> Split<M>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    /// Plans `chain` as at most `most` pieces of at least `min` bytes. `None` (execute
    /// the request whole) unless it is a read or write of at least two such pieces, in
    /// range, allowed, and with data buffers that can be lent straight from guest memory
    /// (for a read: no two of them overlapping, so the pieces never write the same
    /// memory), i.e. unless every piece would succeed or fail on the image alone.
    pub(crate) fn plan(
        export: &Export,
        chain: &DescriptorChain<M>,
        min: usize,
        most: usize,
    ) -> Option<Self> {
        let mem = chain.memory();
        let mut reader = chain.clone().reader(mem).ok()?;
        let (ty, offset) = header(&mut reader).ok()?;
        // Lengths from the descriptors alone (virtio-queue's reader or writer over the
        // data would look up every guest page once more).
        let bytes = |writable: bool| {
            chain
                .clone()
                .filter(|d| d.is_write_only() == writable)
                .try_fold(0usize, |n, d| n.checked_add(d.len() as usize))
        };
        let (read, len) = match ty {
            T_IN => (true, bytes(true)?.checked_sub(1)?),
            T_OUT if !export.read_only() => (false, bytes(false)?.checked_sub(HEADER)?),
            _ => return None,
        };
        let n = (len / min.max(1)).min(most);
        if n < 2 || in_range(export, offset, len).is_err() {
            return None;
        }
        let slices = data_slices(chain, mem, read, 0, len)?;
        if read && !guest::disjoint(&slices) {
            return None;
        }
        let piece = len.div_ceil(n).next_multiple_of(ALIGN);
        let pieces = len.div_ceil(piece);
        (pieces >= 2).then(|| Split {
            chain: chain.clone(),
            read,
            offset,
            len,
            piece,
            status: AtomicU8::new(S_OK),
            left: AtomicUsize::new(pieces),
        })
    }

    /// How many pieces the request was cut into.
    pub(crate) fn pieces(&self) -> usize {
        self.len.div_ceil(self.piece)
    }

    /// The data bytes of piece `i`.
    fn range(&self, i: usize) -> Range<usize> {
        let start = i.saturating_mul(self.piece).min(self.len);
        start..start.saturating_add(self.piece).min(self.len)
    }

    /// Executes piece `i` (each exactly once, on any thread); returns the request's
    /// completion (descriptor head, used length) when it was the last piece to finish.
    pub(crate) fn run(&self, export: &Export, i: usize) -> Option<(u16, u32)> {
        if let Err(s) = self.transfer(export, self.range(i)) {
            let byte = match s {
                Status::Unsupp => S_UNSUPP,
                Status::IoErr => S_IOERR,
            };
            let _ = self
                .status
                .compare_exchange(S_OK, byte, Ordering::AcqRel, Ordering::Acquire);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        Some(self.finish())
    }

    /// Moves the bytes of `range` between guest memory and the image.
    fn transfer(&self, export: &Export, range: Range<usize>) -> Result<(), Status> {
        let mem = self.chain.memory();
        let at = self.offset + range.start as u64;
        let slices = data_slices(&self.chain, mem, self.read, range.start, range.len())
            .ok_or(Status::IoErr)?;
        let r: Result<(), Fault> = if self.read {
            guest::with_mut(&slices, |bufs| export.read_vectored(bufs, at)).ok_or(Status::IoErr)?
        } else {
            guest::with_shared(&slices, |bufs| export.write_vectored(bufs, at, false))
        };
        Ok(r?)
    }

    /// Writes the status byte after the data; returns the completion.
    fn finish(&self) -> (u16, u32) {
        let head = self.chain.head_index();
        let status = self.status.load(Ordering::Acquire);
        let mem = self.chain.memory();
        // The status byte: the last byte of the last non-empty driver-writable
        // descriptor (where virtio-queue's writer would put it, without its walk of
        // every page of a read's data).
        let last = self
            .chain
            .clone()
            .filter(|d| d.is_write_only() && d.len() > 0)
            .last();
        let at = last.and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1));
        let Some(at) = at else {
            return (head, 0);
        };
        if mem.write_slice(&[status], at).is_err() {
            return (head, 0);
        }
        let data = if self.read && status == S_OK {
            self.len
        } else {
            0
        };
        (head, u32::try_from(data + 1).unwrap_or(u32::MAX))
    }
}
