//! Guest memory lent to the device as byte slices, so that a virtio-blk read lands in
//! guest memory and a write leaves from it with one copy (the kernel's, in
//! `preadv(2)` / `pwritev(2)` or the page cache), as qemu-storage-daemon's do, instead of
//! going through a bounce buffer (two copies: docs/benchmarks.md measured the second one
//! as 29% of the server's time for 1 MiB writes).
//!
//! # Why this module uses `unsafe`
//!
//! vm-memory hands out guest memory only as [`VolatileSlice`]s (a pointer and a length),
//! because the guest can change it at any time; the format layer reads into `&mut [u8]`
//! and writes from `&[u8]` (as [`IoSliceMut`] / [`IoSlice`] lists). vm-memory has no
//! positional I/O on volatile memory (its `ReadVolatile` / `WriteVolatile` for files use
//! `read(2)` / `write(2)` at the shared file position), and a safe route through the
//! memfd behind guest memory (`copy_file_range`) fails between tmpfs and the image's
//! file system (`EXDEV`), so there is no safe way to let the kernel copy straight between
//! the image and guest memory. The two functions here build the slices with
//! `slice::from_raw_parts{,_mut}` and nothing else in the crate uses `unsafe`.
//!
//! What keeps that sound:
//! - **Valid memory.** Every [`VolatileSlice`] comes from the request's guest memory
//!   (`GuestMemory::get_slices`, bounds-checked against the memory map), and its lifetime
//!   `'m` ties it to the guest-memory guard the caller holds, so the mapping cannot be
//!   replaced or unmapped while the byte slices (borrowed for at most the closure's
//!   call) exist. vm-memory's pointer guards are taken and held for the call as well.
//! - **No aliasing inside the process.** [`with_mut`] refuses (returns `None`, and the
//!   caller falls back to its bounce buffer) when any two of the writable slices overlap,
//!   which a driver could otherwise arrange by naming the same memory twice; the shared
//!   slices of [`with_shared`] are only read. A chain is executed by one thread, and the
//!   virtio contract gives the device the buffers until it puts the chain in the used
//!   ring, which happens after the closure returns.
//! - **The guest on the other side.** The guest may still write its own buffers while
//!   its request is in flight, or name the same memory in two requests that run on two
//!   threads (a broken or hostile driver): from this process's view that memory then
//!   changes under a borrow, as shared memory can. The bytes are only handed on (to the
//!   kernel, or copied by the format layer), never read twice expecting the same value
//!   and never trusted for memory safety, so such a guest gets torn data in its own
//!   requests, as with a DMA device, and nothing else. qemu and the rust-vmm block
//!   devices rely on the same contract.
//! - **Dirty logging.** Writes through the slices bypass vm-memory's dirty bitmap, so
//!   [`with_mut`] marks every slice dirty after the closure (a no-op for the `()` bitmap
//!   the server uses).

#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut};

use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

/// Calls `f` with `slices` as byte slices to read from (a device write).
pub(crate) fn with_shared<B: BitmapSlice, R>(
    slices: &[VolatileSlice<'_, B>],
    f: impl FnOnce(&[IoSlice<'_>]) -> R,
) -> R {
    let guards = guards(slices, VolatileSlice::ptr_guard);
    let bufs: Vec<IoSlice<'_>> = guards
        .iter()
        .map(|g| {
            // SAFETY: `g` points at `g.len()` mapped bytes of guest memory that stay
            // mapped while `slices` is borrowed (module docs: "Valid memory"); they are
            // only read through this slice.
            IoSlice::new(unsafe { std::slice::from_raw_parts(g.as_ptr(), g.len()) })
        })
        .collect();
    f(&bufs)
}

/// Calls `f` with `slices` as byte slices to fill (a device read), or returns `None`
/// when two of them overlap.
pub(crate) fn with_mut<B: BitmapSlice, R>(
    slices: &[VolatileSlice<'_, B>],
    f: impl FnOnce(&mut [IoSliceMut<'_>]) -> R,
) -> Option<R> {
    let guards = guards(slices, VolatileSlice::ptr_guard_mut);
    if !disjoint_spans(guards.iter().map(|g| (g.as_ptr() as usize, g.len()))) {
        return None;
    }
    let mut bufs: Vec<IoSliceMut<'_>> = guards
        .iter()
        .map(|g| {
            // SAFETY: as in `with_shared`, and the spans were just checked to be pairwise
            // disjoint, so no two of these mutable slices alias (module docs).
            IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(g.as_ptr(), g.len()) })
        })
        .collect();
    let r = f(&mut bufs);
    for s in slices {
        s.bitmap().mark_dirty(0, s.len());
    }
    Some(r)
}

/// Whether no two of `slices` share a byte (what [`with_mut`] requires; the pieces of
/// one request run on several threads only when its buffers pass this).
pub(crate) fn disjoint<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>]) -> bool {
    let guards = guards(slices, VolatileSlice::ptr_guard);
    disjoint_spans(guards.iter().map(|g| (g.as_ptr() as usize, g.len())))
}

/// What `guard` makes of each non-empty slice of `slices` (the pointer guards the
/// callers turn into byte slices), in order, in one allocation of the list's size.
fn guards<'m, B: BitmapSlice, G>(
    slices: &[VolatileSlice<'m, B>],
    guard: impl Fn(&VolatileSlice<'m, B>) -> G,
) -> Vec<G> {
    #[allow(clippy::disallowed_methods, reason = "sized by a list in memory")]
    let mut guards = Vec::with_capacity(slices.len());
    guards.extend(slices.iter().filter(|s| !s.is_empty()).map(guard));
    guards
}

/// Whether the (address, length) spans are pairwise disjoint.
fn disjoint_spans(spans: impl Iterator<Item = (usize, usize)>) -> bool {
    let mut spans: Vec<(usize, usize)> = spans.collect();
    if !spans.is_sorted() {
        spans.sort_unstable();
    }
    spans
        .windows(2)
        .all(|w| matches!(w, [(a, n), (b, _)] if a.checked_add(*n).is_some_and(|end| end <= *b)))
}
