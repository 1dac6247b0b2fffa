//! One virtio-blk request (virtio 1.2, section 5.2.6 "Device Operation"): the header
//! and data from the driver-readable descriptors, the data and status byte to the
//! driver-writable ones.

use std::io::{Read, Write};
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

use crate::export::{Export, Fault};

/// Request types (`VIRTIO_BLK_T_*`).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Status values (`VIRTIO_BLK_S_*`).
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Sector size of every virtio-blk offset.
pub(crate) const SECTOR: u64 = 512;
/// Most discard / write-zeroes segments in one request (`max_discard_seg`).
pub(crate) const MAX_SEGMENTS: u32 = 32;
/// The id returned for `VIRTIO_BLK_T_GET_ID` (at most 20 bytes).
const SERIAL: &[u8] = b"diskimg";

/// What a request failed with: virtio's status byte.
enum Status {
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
    let status = match execute(export, &mut reader, &mut writer, &mut written) {
        Ok(()) => S_OK,
        Err(Status::IoErr) => S_IOERR,
        Err(Status::Unsupp) => S_UNSUPP,
    };
    if status_w.write_all(&[status]).is_err() {
        return (head, 0);
    }
    (head, u32::try_from(written + 1).unwrap_or(u32::MAX))
}

fn execute<R: Read, W: Write + Avail>(
    export: &Export,
    reader: &mut R,
    writer: &mut W,
    written: &mut usize,
) -> Result<(), Status> {
    let mut hdr = [0u8; 16];
    reader.read_exact(&mut hdr).map_err(|_| Status::IoErr)?;
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
    let offset = sector.checked_mul(SECTOR).ok_or(Status::IoErr)?;
    match ty {
        T_IN => {
            let len = writer.avail();
            let mut buf = vec![0u8; len];
            export.read(&mut buf, offset)?;
            writer.write_all(&buf).map_err(|_| Status::IoErr)?;
            *written = len;
            Ok(())
        }
        T_OUT => {
            let mut buf = Vec::new();
            // The readable part is bounded by the descriptor chain the driver built.
            reader.read_to_end(&mut buf).map_err(|_| Status::IoErr)?;
            Ok(export.write(&buf, offset, false)?)
        }
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

/// How many bytes a writer can still take.
trait Avail {
    fn avail(&self) -> usize;
}

impl<B: vm_memory::bitmap::BitmapSlice> Avail for virtio_queue::Writer<'_, B> {
    fn avail(&self) -> usize {
        self.available_bytes()
    }
}
