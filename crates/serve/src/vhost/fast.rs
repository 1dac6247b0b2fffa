//! The common read and write request in one walk of its descriptors.
//!
//! A driver lays a read or write out as a 16-byte header descriptor, the data
//! descriptors (all driver-writable for a read, all driver-readable for a write) and a
//! one-byte status descriptor (virtio 1.2 section 5.2.6). For that layout the data
//! slices come from one pass over the chain, each descriptor looked up once
//! (the first slice `GuestMemory::get_slices` yields; one that crosses a region
//! boundary takes the general path); the general path ([`super::request::process`]) builds
//! virtio-queue's reader and writer over the chain and then the data slices, three
//! walks of every guest page of a 1 MiB request (the vm-memory slice iterator was
//! 14% of the host time of such requests). Anything else (a header sharing its buffer
//! with data, a descriptor crossing memory regions, overlapping read buffers, an
//! out-of-range or refused request) returns `None` before touching the image, and
//! the general path executes it as before.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemory, Permissions};

use super::guest;
use super::request::{HEADER, S_IOERR, S_OK, S_UNSUPP, T_IN, T_OUT, header, in_range};
use crate::export::{Export, Fault};

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
    let mem = chain.memory();
    let descs: Vec<Descriptor> = chain.clone().collect();
    let (first, rest) = descs.split_first()?;
    let (last, data) = rest.split_last()?;
    if first.is_write_only() || first.len() as usize != HEADER {
        return None;
    }
    if !last.is_write_only() || last.len() != 1 {
        return None;
    }
    let mut hdr = [0u8; HEADER];
    mem.read_slice(&mut hdr, first.addr()).ok()?;
    let (ty, offset) = header(&mut &hdr[..]).ok()?;
    let read = match ty {
        T_IN => true,
        T_OUT if !export.read_only() => false,
        _ => return None,
    };
    let mut slices = Vec::new();
    let mut len = 0usize;
    for d in data.iter().filter(|d| d.len() > 0) {
        if d.is_write_only() != read {
            return None;
        }
        let perm = if read {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let n = d.len() as usize;
        let s = mem.get_slices(d.addr(), n, perm).ok()?.next()?.ok()?;
        if s.len() != n {
            return None;
        }
        slices.push(s);
        len = len.checked_add(n)?;
    }
    in_range(export, offset, len).ok()?;
    let status = mem
        .get_slices(last.addr(), 1, Permissions::Write)
        .ok()?
        .next()?
        .ok()?;
    let result: Result<(), Fault> = if read {
        guest::with_mut(&slices, |bufs| export.read_vectored(bufs, offset))?
    } else {
        guest::with_shared(&slices, |bufs| export.write_vectored(bufs, offset, false))
    };
    let (byte, written) = match result {
        Ok(()) => (S_OK, if read { len } else { 0 }),
        Err(Fault::NotSup) => (S_UNSUPP, 0),
        Err(_) => (S_IOERR, 0),
    };
    let head = chain.head_index();
    if status.write_obj(byte, 0).is_err() {
        return Some((head, 0));
    }
    Some((head, u32::try_from(written + 1).unwrap_or(u32::MAX)))
}
