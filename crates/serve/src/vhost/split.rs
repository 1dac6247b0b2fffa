//! One large read or write executed as pieces on several threads at once.
//!
//! qemu-storage-daemon advertises 4 KiB segments and at most 126 of them, so the guest
//! splits a 1 MiB request into two or three that its thread pool runs side by side;
//! diskimg takes the request whole (no segment limits, fewer requests for the guest) and
//! splits it itself, but only at queue depth 1 (the queue idle, and the last batches
//! lone requests as well: the other threads have nothing else to do; at a deeper queue
//! they are busy with other requests and a split only adds hand-offs).
//!
//! The request is parsed once ([`Plain`]: one walk of its descriptors) and cut into
//! pieces of consecutive data bytes. The thread that planned it wakes helpers and then
//! claims pieces itself, one at a time, as the helpers do: a helper that wakes late
//! finds fewer pieces left (or none), so a busy host costs the request little more than
//! executing it whole, and an idle one copies the pieces side by side. Each piece moves
//! its own byte range of the request's data straight between guest memory and the
//! image; whichever thread finishes the last piece writes the status byte (an error if
//! any piece failed) and completes the request, exactly once, without waiting for or
//! waking anyone.

use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

use super::fast::{Plain, status_of};
use super::request::{S_IOERR, S_OK};
use crate::export::Export;

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
    plain: Plain,
    /// Bytes per piece (the last may be shorter).
    piece: usize,
    /// The status byte so far: `S_OK` until a piece fails.
    status: AtomicU8,
    /// The next piece to claim.
    next: AtomicUsize,
    /// Pieces finished.
    done: AtomicUsize,
}

impl<M> Split<M>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    /// Plans `chain` as at most `most` pieces of at least `min` bytes. `None` (execute
    /// the request whole) unless it is a plain read or write ([`Plain`]) of at least two
    /// such pieces, in range, allowed, and (for a read) with no two data buffers naming
    /// the same guest memory, so the pieces never write the same memory, i.e. unless
    /// every piece would succeed or fail on the image alone.
    pub(crate) fn plan(
        export: &Export,
        chain: &DescriptorChain<M>,
        min: usize,
        most: usize,
    ) -> Option<Self> {
        #[cfg(test)]
        if super::request::FORCE_BOUNCE.with(std::cell::Cell::get) {
            return None;
        }
        let plain = Plain::parse(export, chain)?;
        let n = (plain.len / min.max(1)).min(most);
        if n < 2 || (plain.read && !plain.disjoint(chain.memory())) {
            return None;
        }
        let piece = plain.len.div_ceil(n).next_multiple_of(ALIGN);
        (plain.len.div_ceil(piece) >= 2).then(|| Split {
            chain: chain.clone(),
            plain,
            piece,
            status: AtomicU8::new(S_OK),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        })
    }

    /// How many pieces the request was cut into.
    pub(crate) fn pieces(&self) -> usize {
        self.plain.len.div_ceil(self.piece)
    }

    /// The data bytes of piece `i`.
    fn range(&self, i: usize) -> Range<usize> {
        let len = self.plain.len;
        let start = i.saturating_mul(self.piece).min(len);
        start..start.saturating_add(self.piece).min(len)
    }

    /// Executes pieces nobody has claimed yet, until none is left (on any thread, any
    /// number of times); returns the request's completion when this thread finished
    /// its last piece.
    pub(crate) fn work(&self, export: &Export) -> Option<(u16, u32)> {
        let mut done = None;
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.pieces() {
                return done;
            }
            done = self.run(export, i);
        }
    }

    /// Executes piece `i` (each exactly once, on any thread); returns the request's
    /// completion (descriptor head, used length) when it was the last piece to finish,
    /// after writing the status byte.
    pub(crate) fn run(&self, export: &Export, i: usize) -> Option<(u16, u32)> {
        let byte = self
            .plain
            .transfer(export, self.chain.memory(), self.range(i))
            .map_or(S_IOERR, status_of);
        if byte != S_OK {
            let _ = self
                .status
                .compare_exchange(S_OK, byte, Ordering::AcqRel, Ordering::Acquire);
        }
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 != self.pieces() {
            return None;
        }
        let byte = self.status.load(Ordering::Acquire);
        let len = self.plain.complete(self.chain.memory(), byte);
        Some((self.chain.head_index(), len))
    }
}
