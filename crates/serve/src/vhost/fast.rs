//! The common read and write request in one walk of its descriptors.
//!
//! A driver lays a read or write out as a 16-byte header descriptor, the data
//! descriptors (all driver-writable for a read, all driver-readable for a write) and a
//! one-byte status descriptor (virtio 1.2 section 5.2.6). For that layout ([`Plain`])
//! the data slices come from one pass over the chain, each descriptor looked up once
//! (the first slice `GuestMemory::get_slices` yields; one that crosses a region
//! boundary takes the general path); the general path ([`super::request::process`]) builds
//! virtio-queue's reader and writer over the chain and then the data slices, three
//! walks of every guest page of a 1 MiB request (the vm-memory slice iterator was
//! 14% of the host time of such requests). Anything else (a header sharing its buffer
//! with data, a descriptor crossing memory regions, overlapping read buffers, an
//! out-of-range or refused request) returns `None` before touching the image, and
//! the general path executes it as before. A split request ([`super::split`]) starts
//! from the same [`Plain`] layout.

use std::ops::{Deref, Range};

use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::BS;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

use super::guest;
use super::request::{HEADER, S_IOERR, S_OK, S_UNSUPP, T_IN, T_OUT, header, in_range};
use crate::export::{Export, Fault};

thread_local! {
    /// The descriptors of the chain being parsed on this thread ([`Plain::parse`]).
    static SCRATCH: std::cell::RefCell<Vec<Descriptor>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A plain read or write request: its header read, its data descriptors and its
/// status byte located, from one walk of the chain.
pub(super) struct Plain {
    /// A read (`VIRTIO_BLK_T_IN`: the device fills the data), else a write.
    pub(super) read: bool,
    /// Image offset of the first data byte.
    pub(super) offset: u64,
    /// The non-empty data descriptors, in order.
    data: Vec<Descriptor>,
    /// Data bytes of the request.
    pub(super) len: usize,
    /// Guest address of the status byte.
    pub(super) status: GuestAddress,
}

impl Plain {
    /// The layout of `chain` when it is a plain read, or a write the export allows,
    /// inside the export (see the module docs); `None` otherwise.
    pub(super) fn parse<M>(export: &Export, chain: &DescriptorChain<M>) -> Option<Self>
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
    {
        // The walk collects into this thread's scratch list, and the data descriptors
        // are copied out in one allocation of their exact size: growing a list as the
        // chain is walked reallocated up to seven times for a 1 MiB request, taking
        // the allocator's locks against the other workers (docs/benchmarks.md,
        // "Session 9").
        let (first, last, kept) = SCRATCH.with_borrow_mut(|all| {
            all.clear();
            all.extend(chain.clone());
            let (first, rest) = all.split_first()?;
            let (last, data) = rest.split_last()?;
            #[allow(clippy::disallowed_methods, reason = "sized by a list in memory")]
            let mut kept = Vec::with_capacity(data.len());
            kept.extend(data.iter().filter(|d| d.len() > 0).copied());
            Some((*first, *last, kept))
        })?;
        if first.is_write_only() || first.len() as usize != HEADER {
            return None;
        }
        if !last.is_write_only() || last.len() != 1 {
            return None;
        }
        let mut hdr = [0u8; HEADER];
        chain.memory().read_slice(&mut hdr, first.addr()).ok()?;
        let (ty, offset) = header(&mut &hdr[..]).ok()?;
        let read = match ty {
            T_IN => true,
            T_OUT if !export.read_only() => false,
            _ => return None,
        };
        let mut len = 0usize;
        for d in &kept {
            if d.is_write_only() != read {
                return None;
            }
            len = len.checked_add(d.len() as usize)?;
        }
        in_range(export, offset, len).ok()?;
        Some(Plain {
            read,
            offset,
            data: kept,
            len,
            status: last.addr(),
        })
    }

    /// Whether the status byte can be written (checked before the image is touched).
    pub(super) fn status_writable<G: GuestMemory>(&self, mem: &G) -> bool {
        mem.get_slices(self.status, 1, Permissions::Write)
            .ok()
            .and_then(|mut i| i.next())
            .is_some_and(|r| r.is_ok())
    }

    /// Guest memory of data bytes `range`, one slice per descriptor (part); `None`
    /// when a descriptor is not inside one memory region.
    pub(super) fn slices<'m, G: GuestMemory>(
        &self,
        mem: &'m G,
        range: Range<usize>,
    ) -> Option<Vec<VolatileSlice<'m, BS<'m, G::Bitmap>>>> {
        let perm = if self.read {
            Permissions::Write
        } else {
            Permissions::Read
        };
        #[allow(clippy::disallowed_methods, reason = "sized by a list in memory")]
        let mut out = Vec::with_capacity(self.data.len());
        let mut at = 0usize;
        for d in &self.data {
            let n = d.len() as usize;
            let end = at.checked_add(n)?;
            if end > range.start {
                let from = range.start.saturating_sub(at);
                let to = range.end.min(end) - at;
                let s = mem.get_slices(d.addr(), n, perm).ok()?.next()?.ok()?;
                if s.len() != n {
                    return None;
                }
                out.push(s.subslice(from, to.checked_sub(from)?).ok()?);
            }
            if end >= range.end {
                break;
            }
            at = end;
        }
        Some(out)
    }

    /// Whether no two data buffers share a byte of host memory (the pieces of a split
    /// read, run on several threads, then never write the same memory); false when
    /// the buffers cannot be lent at all.
    pub(super) fn disjoint<G: GuestMemory>(&self, mem: &G) -> bool {
        self.slices(mem, 0..self.len)
            .is_some_and(|s| guest::disjoint(&s))
    }

    /// Moves data bytes `range` between guest memory and the image; `None` when the
    /// guest memory cannot be lent (outside a region, or overlapping read buffers).
    pub(super) fn transfer<G: GuestMemory>(
        &self,
        export: &Export,
        mem: &G,
        range: Range<usize>,
    ) -> Option<Result<(), Fault>> {
        let at = self.offset.checked_add(range.start as u64)?;
        let slices = self.slices(mem, range)?;
        if self.read {
            guest::with_mut(&slices, |bufs| export.read_vectored(bufs, at))
        } else {
            Some(guest::with_shared(&slices, |bufs| {
                export.write_vectored(bufs, at, false)
            }))
        }
    }

    /// Writes status byte `byte`; returns the used length of the completion (the data
    /// filled for a successful read, and the status byte), 0 when the byte cannot be
    /// written.
    pub(super) fn complete<G: GuestMemory>(&self, mem: &G, byte: u8) -> u32 {
        if mem.write_obj(byte, self.status).is_err() {
            return 0;
        }
        let data = if self.read && byte == S_OK {
            self.len
        } else {
            0
        };
        u32::try_from(data + 1).unwrap_or(u32::MAX)
    }
}

/// The status byte of a finished transfer.
pub(super) fn status_of(result: Result<(), Fault>) -> u8 {
    match result {
        Ok(()) => S_OK,
        Err(Fault::NotSup) => S_UNSUPP,
        Err(_) => S_IOERR,
    }
}

/// Executes `chain` when it is a plain read or write (see the module docs); returns its
/// completion (descriptor head, bytes written to driver-writable descriptors).
pub(super) fn read_or_write<M>(export: &Export, chain: &DescriptorChain<M>) -> Option<(u16, u32)>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    #[cfg(test)]
    if super::request::FORCE_BOUNCE.with(std::cell::Cell::get) {
        return None;
    }
    let plain = Plain::parse(export, chain)?;
    let mem = chain.memory();
    if !plain.status_writable(mem) {
        return None;
    }
    let byte = status_of(plain.transfer(export, mem, 0..plain.len)?);
    Some((chain.head_index(), plain.complete(mem, byte)))
}
