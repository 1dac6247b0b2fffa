//! Compressed clusters (`convert -c`), in two steps: [`compress_units`] deflates (or
//! zstd-compresses) whole clusters without touching the image, on whichever thread
//! calls it; [`write_units`] allocates their bytes, writes them and points the L2
//! entries at them, under the metadata lock.
//!
//! Compressed clusters are packed as qemu's `qcow2_alloc_bytes` packs them: each one
//! right after the previous, spilling into the next host cluster when that one directly
//! follows. Every host cluster a compressed cluster touches holds one reference for it.
//! A run of clusters goes to the file in as few writes as the packing allows (one, unless
//! a new L2 table lands between them).

use diskimg_blockio::{CompressedUnits, Error, PackedUnit, Result, check_range};

use crate::device::Qcow2Device;
use crate::disk::compress;
use crate::disk::idx;
use crate::disk::table::{L2E_OFFSET_MASK, OFLAG_COMPRESSED};
use crate::engine::deferred::L2Update;
use crate::engine::meta::Meta;
use crate::write::{ensure_l2, write};

/// Cluster size, compression type and virtual size, when the image takes compressed
/// clusters at all.
fn target(dev: &Qcow2Device) -> Result<(u64, u8, u64)> {
    if dev.crypt.is_some() {
        return Err(Error::unsupported(
            "qcow2",
            "compressed writes to encrypted images",
        ));
    }
    let m = dev.lock();
    if m.data().is_some() {
        return Err(Error::unsupported(
            "qcow2",
            "compressed writes to images with a data file",
        ));
    }
    Ok((m.cs(), m.h().compression_type, m.size()))
}

/// Refuses ranges that are not whole clusters (the last one may be the image's partial
/// last cluster).
fn check_units(off: u64, len: u64, cs: u64, size: u64) -> Result<()> {
    check_range(off, len, size)?;
    if len == 0 || !off.is_multiple_of(cs) || (!len.is_multiple_of(cs) && off + len != size) {
        return Err(Error::invalid(
            "qcow2: compressed writes must cover whole clusters",
        ));
    }
    Ok(())
}

/// `BlockDevice::compress_units`: each cluster of `buf` compressed (zero-padded when it
/// is the image's partial last one), or kept plain when compression does not shrink it.
pub(crate) fn compress_units(dev: &Qcow2Device, buf: &[u8], off: u64) -> Result<CompressedUnits> {
    let (cs, ty, size) = target(dev)?;
    let len = buf.len() as u64;
    check_units(off, len, cs, size)?;
    let mut units = Vec::new();
    let mut padded = Vec::new();
    for piece in buf.chunks(idx(cs)) {
        let input = if piece.len() as u64 == cs {
            piece
        } else {
            padded.clear();
            padded.extend_from_slice(piece);
            padded.resize(idx(cs), 0);
            padded.as_slice()
        };
        units.push(match compress::compress(ty, input)? {
            Some(c) => PackedUnit::Compressed(c),
            None => PackedUnit::Plain(piece.to_vec()),
        });
    }
    Ok(CompressedUnits {
        offset: off,
        len,
        units,
    })
}

/// `BlockDevice::write_compressed_units`: stores what [`compress_units`] prepared.
/// Refuses (before writing anything) when a cluster is already allocated.
pub(crate) fn write_units(dev: &Qcow2Device, cu: CompressedUnits) -> Result<()> {
    let (cs, _, size) = target(dev)?;
    check_units(cu.offset, cu.len, cs, size)?;
    let ranges = cu.unit_ranges(cs)?;
    let mut m = dev.lock();
    for &(off, _) in &ranges {
        let (e, _, _) = m.l2_entry(off)?;
        if e & (L2E_OFFSET_MASK | OFLAG_COMPRESSED) != 0 {
            return Err(Error::invalid(
                "qcow2: compressed writes cannot overwrite allocated clusters",
            ));
        }
    }
    let mut out = Packer::default();
    for ((off, n), unit) in ranges.into_iter().zip(cu.units) {
        match unit {
            PackedUnit::Compressed(c) => out.add(dev, &mut m, off, &c)?,
            PackedUnit::Plain(p) => {
                if p.len() as u64 != n {
                    return Err(Error::invalid("qcow2: plain unit of the wrong length"));
                }
                // An incompressible cluster is written as ordinary data, as qemu does.
                out.finish(dev, &mut m)?;
                drop(m);
                write(dev, &p, off)?;
                m = dev.lock();
            }
        }
    }
    out.finish(dev, &mut m)
}

/// Compressed clusters allocated but not yet written: their bytes (contiguous in the
/// file from `host`) and the L2 entries to point at them once written.
#[derive(Default)]
struct Packer {
    host: u64,
    bytes: Vec<u8>,
    l2: Vec<L2Update>,
}

impl Packer {
    /// Allocates room for compressed cluster `c` of guest offset `off`.
    fn add(&mut self, dev: &Qcow2Device, m: &mut Meta, off: u64, c: &[u8]) -> Result<()> {
        let cs = m.cs();
        let len = c.len() as u64;
        if len == 0 || len >= cs {
            return Err(Error::invalid(
                "qcow2: compressed cluster of an invalid size",
            ));
        }
        let l2 = ensure_l2(m, off / m.h().l1_coverage())?;
        let i = (off / cs) % m.h().l2_entries();
        let host = m.alloc_bytes(len)?;
        let x = 62 - (m.h().cluster_bits - 8);
        if host + len > 1u64 << x {
            return Err(Error::invalid(
                "qcow2: image too large for compressed clusters",
            ));
        }
        if self.bytes.is_empty() || self.host + self.bytes.len() as u64 != host {
            self.write_out(dev)?;
            self.host = host;
        }
        self.bytes.extend_from_slice(c);
        let nsec = (host + len - 1) / 512 - host / 512;
        self.l2.push(L2Update::new(
            l2,
            i,
            OFLAG_COMPRESSED | host | (nsec << x),
            0,
        ));
        Ok(())
    }

    fn write_out(&mut self, dev: &Qcow2Device) -> Result<()> {
        if !self.bytes.is_empty() {
            dev.file.write_all_at(&self.bytes, self.host)?;
            self.bytes.clear();
        }
        Ok(())
    }

    /// Writes what is pending and records the L2 updates (written after a flush, at
    /// the next commit).
    fn finish(&mut self, dev: &Qcow2Device, m: &mut Meta) -> Result<()> {
        self.write_out(dev)?;
        if self.l2.is_empty() {
            return Ok(());
        }
        m.defer(std::mem::take(&mut self.l2), Vec::new(), true)
    }
}

/// `BlockDevice::write_compressed`: both steps on the calling thread.
pub(crate) fn write_compressed(dev: &Qcow2Device, buf: &[u8], off: u64) -> Result<()> {
    let cu = compress_units(dev, buf, off)?;
    write_units(dev, cu)
}
