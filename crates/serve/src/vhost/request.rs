//! One virtio-blk request (virtio 1.2, section 5.2.6 "Device Operation"): the header
//! and data from the driver-readable descriptors, the data and status byte to the
//! driver-writable ones.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::{GuestMemory, Permissions, VolatileSlice};

use super::guest;
use crate::export::{Export, Fault};

/// Request types (`VIRTIO_BLK_T_*`).
pub(super) const T_IN: u32 = 0;
pub(super) const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Status values (`VIRTIO_BLK_S_*`).
pub(super) const S_OK: u8 = 0;
pub(super) const S_IOERR: u8 = 1;
pub(super) const S_UNSUPP: u8 = 2;

/// Length of `struct virtio_blk_req`'s header (type, reserved, sector).
pub(super) const HEADER: usize = 16;
/// Sector size of every virtio-blk offset.
pub(crate) const SECTOR: u64 = 512;
/// Most discard / write-zeroes segments in one request (`max_discard_seg`).
pub(crate) const MAX_SEGMENTS: u32 = 32;
/// The id returned for `VIRTIO_BLK_T_GET_ID` (at most 20 bytes).
const SERIAL: &[u8] = b"diskimg";
/// Largest piece of a read or write moved at once: bounds the buffer a descriptor
/// chain (which may name the same guest memory many times) can make us allocate.
const CHUNK: usize = 1 << 20;

thread_local! {
    /// Each thread's bounce buffer between the image and guest memory, reused so a
    /// request costs neither an allocation nor zeroing.
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Tests: every read and write goes through the bounce buffer (to compare the paths).
    pub(crate) static FORCE_BOUNCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on this thread's buffer, `len` (at most [`CHUNK`]) bytes long.
fn with_buf<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < len {
            b.resize(len, 0);
        }
        f(b.get_mut(..len).unwrap_or_default())
    })
}

/// Fails unless `len` bytes at `offset` lie inside the export, so a request never
/// half-executes before failing on the range.
pub(super) fn in_range(export: &Export, offset: u64, len: usize) -> Result<(), Status> {
    let end = offset.checked_add(len as u64).ok_or(Status::IoErr)?;
    if end > export.size() {
        return Err(Status::IoErr);
    }
    Ok(())
}

/// What a request failed with: virtio's status byte.
pub(super) enum Status {
    IoErr,
    Unsupp,
}

impl From<Fault> for Status {
    fn from(f: Fault) -> Self {
        match f {
            Fault::NotSup => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// Executes the request in `chain` against `export`; returns the descriptor head and
/// the number of bytes written to driver-writable descriptors (data and status).
/// A chain too broken to carry a status byte completes with length 0.
pub(crate) fn process<M>(export: &Export, chain: DescriptorChain<M>) -> (u16, u32)
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    if let Some(done) = super::fast::read_or_write(export, &chain) {
        return done;
    }
    let head = chain.head_index();
    let mem = chain.memory();
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.clone().writer(mem))
    else {
        return (head, 0);
    };
    let avail = writer.available_bytes();
    if avail == 0 {
        return (head, 0);
    }
    let Ok(mut status_w) = writer.split_at(avail - 1) else {
        return (head, 0);
    };
    let mut written = 0usize;
    let result = header(&mut reader).and_then(|(ty, offset)| match ty {
        T_IN => {
            let len = writer.avail();
            in_range(export, offset, len)?;
            let direct = data_slices(&chain, mem, true, 0, len).and_then(|slices| {
                guest::with_mut(&slices, |bufs| export.read_vectored(bufs, offset))
            });
            match direct {
                Some(r) => r?,
                None => bounced(len, offset, |b, o| {
                    export.read(b, o)?;
                    writer.write_all(b).map_err(|_| Status::IoErr)
                })?,
            }
            written = len;
            Ok(())
        }
        T_OUT => {
            let len = reader.avail();
            in_range(export, offset, len)?;
            if export.read_only() {
                return Err(Status::IoErr);
            }
            match data_slices(&chain, mem, false, 0, len) {
                Some(slices) => Ok(guest::with_shared(&slices, |bufs| {
                    export.write_vectored(bufs, offset, false)
                })?),
                None => bounced(len, offset, |b, o| {
                    reader.read_exact(b).map_err(|_| Status::IoErr)?;
                    Ok(export.write(b, o, false)?)
                }),
            }
        }
        _ => execute(export, ty, &mut reader, &mut writer, &mut written),
    });
    let status = match result {
        Ok(()) => S_OK,
        Err(Status::IoErr) => S_IOERR,
        Err(Status::Unsupp) => S_UNSUPP,
    };
    if status_w.write_all(&[status]).is_err() {
        return (head, 0);
    }
    (head, u32::try_from(written + 1).unwrap_or(u32::MAX))
}

/// The request type and byte offset from the 16-byte `virtio_blk_req` header.
pub(super) fn header<R: Read>(reader: &mut R) -> Result<(u32, u64), Status> {
    let mut hdr = [0u8; HEADER];
    reader.read_exact(&mut hdr).map_err(|_| Status::IoErr)?;
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
    Ok((ty, sector.checked_mul(SECTOR).ok_or(Status::IoErr)?))
}

/// The request's data buffers in guest memory, `len` bytes from byte `start` of the
/// data: the driver-writable bytes before the status byte (`writable`, a read request)
/// or the driver-readable ones after the header (a write). `None` when they cannot be
/// had (a descriptor outside guest memory: the bounce path then fails the request as
/// before).
fn data_slices<'a, M, B>(
    chain: &DescriptorChain<M>,
    mem: &'a M::Target,
    writable: bool,
    start: usize,
    len: usize,
) -> Option<Vec<VolatileSlice<'a, B>>>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
    <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a, S = B>,
    B: BitmapSlice,
{
    #[cfg(test)]
    if FORCE_BOUNCE.with(std::cell::Cell::get) {
        return None;
    }
    let (descs, perm, skip) = if writable {
        (chain.clone().writable(), Permissions::Write, 0)
    } else {
        (chain.clone().readable(), Permissions::Read, HEADER)
    };
    let mut out = Vec::new();
    let mut skip = skip.checked_add(start)?;
    let mut left = len;
    for d in descs {
        if left == 0 {
            break;
        }
        for s in mem.get_slices(d.addr(), d.len() as usize, perm).ok()? {
            let s = s.ok()?;
            let drop = skip.min(s.len());
            skip -= drop;
            let take = (s.len() - drop).min(left);
            if take > 0 {
                out.push(s.subslice(drop, take).ok()?);
                left -= take;
            }
        }
    }
    (left == 0).then_some(out)
}

/// `len` bytes from `offset` through this thread's bounce buffer: `f(piece, offset)`
/// for consecutive pieces of at most [`CHUNK`] bytes.
fn bounced(
    len: usize,
    offset: u64,
    mut f: impl FnMut(&mut [u8], u64) -> Result<(), Status>,
) -> Result<(), Status> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        with_buf(n, |b| f(b, offset + done as u64))?;
        done += n;
    }
    Ok(())
}

/// The requests other than reads and writes.
fn execute<R: Read + Avail, W: Write + Avail>(
    export: &Export,
    ty: u32,
    reader: &mut R,
    writer: &mut W,
    written: &mut usize,
) -> Result<(), Status> {
    match ty {
        T_FLUSH => Ok(export.flush()?),
        T_GET_ID => {
            let n = writer.avail().min(20);
            let mut id = [0u8; 20];
            id.get_mut(..SERIAL.len())
                .ok_or(Status::IoErr)?
                .copy_from_slice(SERIAL);
            writer
                .write_all(id.get(..n).unwrap_or(&[]))
                .map_err(|_| Status::IoErr)?;
            *written = n;
            Ok(())
        }
        T_DISCARD | T_WRITE_ZEROES => segments(export, reader, ty == T_DISCARD),
        _ => Err(Status::Unsupp),
    }
}

/// `virtio_blk_discard_write_zeroes` segments: sector (u64), sectors (u32), flags (u32,
/// bit 0 = unmap).
fn segments<R: Read>(export: &Export, reader: &mut R, discard: bool) -> Result<(), Status> {
    if export.read_only() {
        return Err(Status::IoErr);
    }
    let mut seg = [0u8; 16];
    for i in 0..=MAX_SEGMENTS {
        match reader.read_exact(&mut seg) {
            Ok(()) if i < MAX_SEGMENTS => {}
            Ok(()) => return Err(Status::Unsupp),
            Err(_) if i > 0 => return Ok(()),
            Err(_) => return Err(Status::IoErr),
        }
        let sector = u64::from_le_bytes(seg[..8].try_into().unwrap_or([0; 8]));
        let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
        let off = sector.checked_mul(SECTOR).ok_or(Status::IoErr)?;
        let len = u64::from(count) * SECTOR;
        if discard {
            if flags != 0 {
                return Err(Status::Unsupp);
            }
            export.trim(off, len, false)?;
        } else {
            if flags & !1 != 0 {
                return Err(Status::Unsupp);
            }
            export.write_zeroes(off, len, flags & 1 == 0, false, false)?;
        }
    }
    Ok(())
}

/// How many bytes a writer can still take, or a reader still give.
trait Avail {
    fn avail(&self) -> usize;
}

impl<B: vm_memory::bitmap::BitmapSlice> Avail for virtio_queue::Writer<'_, B> {
    fn avail(&self) -> usize {
        self.available_bytes()
    }
}

impl<B: vm_memory::bitmap::BitmapSlice> Avail for virtio_queue::Reader<'_, B> {
    fn avail(&self) -> usize {
        self.available_bytes()
    }
}
