//! Writes: in place for fixed disks; for dynamic and differencing disks, block
//! allocation ordered for crash safety and sector-bitmap updates.
//!
//! Allocating a block writes a new footer at the new end of the file (flushed, so the
//! file always ends with a valid footer), then the block's data and sector bitmap
//! (over the old footer), flushes, and only then points the BAT entry at it. A crash before the
//! BAT write leaves an unreferenced block (a leak), never a reference to garbage. In a
//! differencing disk, data is flushed before bitmap bits that expose it are set.

use diskimg_blockio::{BlockDevice, Error, Result, check_range, zero_by_buffer};

use crate::device::{Alloc, Dynamic, VhdDevice, read_bitmap};
use crate::footer::FORMAT;
use crate::footer::{DiskType, FOOTER_BYTES};
use crate::header::UNALLOCATED;

/// Sets the bits of sectors `first..last` (MSB first); returns whether any changed.
fn set_bits(bm: &mut [u8], first: u64, last: u64) -> bool {
    let mut changed = false;
    for s in first..last {
        if let Some(b) = usize::try_from(s / 8).ok().and_then(|i| bm.get_mut(i)) {
            let m = 0x80u8 >> (s % 8);
            changed |= *b & m == 0;
            *b |= m;
        }
    }
    changed
}

impl VhdDevice {
    fn dyn_state(&self) -> Result<&Dynamic> {
        self.dynamic
            .as_ref()
            .ok_or(Error::internal("not a dynamic disk"))
    }

    fn lock<'a>(&self, d: &'a Dynamic) -> std::sync::MutexGuard<'a, Alloc> {
        d.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        let Some(d) = &self.dynamic else {
            return self.storage.write_all_at(buf, offset);
        };
        if buf.is_empty() {
            return Ok(());
        }
        let diff = self.footer.disk_type == DiskType::Differencing;
        let start = offset & !511;
        let end = (offset + buf.len() as u64)
            .next_multiple_of(512)
            .min(self.size);
        if diff && (start != offset || end != offset + buf.len() as u64) {
            // Bitmap bits cover whole sectors: merge partial sectors with what reads
            // there now (the parent's data when the bit is clear).
            let mut full = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
            let head = usize::try_from(offset - start).unwrap_or(0);
            if head > 0 {
                let s = full
                    .get_mut(..512)
                    .ok_or(Error::internal("bad merge range"))?;
                self.read_at(s, start)?;
            }
            let tail_at = end.saturating_sub(512).max(start);
            if end > offset + buf.len() as u64 && (tail_at > start || head == 0) {
                let t0 = usize::try_from(tail_at - start).unwrap_or(0);
                let s = full
                    .get_mut(t0..)
                    .ok_or(Error::internal("bad merge range"))?;
                self.read_at(s, tail_at)?;
            }
            full.get_mut(head..head + buf.len())
                .ok_or(Error::internal("bad merge range"))?
                .copy_from_slice(buf);
            return self.write_blocks(d, &full, start);
        }
        self.write_blocks(d, buf, offset)
    }

    fn write_blocks(&self, d: &Dynamic, buf: &[u8], offset: u64) -> Result<()> {
        let mut alloc = self.lock(d);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let room = d.block_size - pos % d.block_size;
            let n = usize::try_from(room.min((buf.len() - done) as u64)).unwrap_or(0);
            let chunk = buf
                .get(done..done + n)
                .ok_or(Error::internal("write chunk out of range"))?;
            self.write_chunk(d, &mut alloc, chunk, pos)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` (inside one block) at guest `pos`, allocating the block if needed.
    fn write_chunk(&self, d: &Dynamic, alloc: &mut Alloc, data: &[u8], pos: u64) -> Result<()> {
        let diff = self.footer.disk_type == DiskType::Differencing;
        let idx = pos / d.block_size;
        let in_block = pos % d.block_size;
        let first = in_block / 512;
        let last = (in_block + data.len() as u64).div_ceil(512);
        let e = d.entry(idx);
        if e != UNALLOCATED {
            let host = d.data_start(e) + in_block;
            d.meta.guard_write(FORMAT, host, data.len() as u64)?;
            if diff {
                d.meta
                    .guard_write(FORMAT, u64::from(e) * 512, d.bitmap_size)?;
            }
            self.storage.write_all_at(data, host)?;
            if diff {
                let mut bm = read_bitmap(self.storage.as_ref(), d, e)?;
                if set_bits(&mut bm, first, last) {
                    self.storage.flush()?;
                    self.storage.write_all_at(&bm, u64::from(e) * 512)?;
                }
            }
            return Ok(());
        }
        // Allocate at the end of the used area (over the old footer).
        let new = alloc.free;
        let sector = u32::try_from(new / 512)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or(Error::unsupported(
                FORMAT,
                "image file too large for the BAT",
            ))?;
        let data_start = new + d.bitmap_size;
        let block_end = data_start + d.block_size;
        d.meta
            .guard_write(FORMAT, new, block_end + FOOTER_BYTES - new)?;
        let file_len = self.storage.len()?;
        // First a valid footer at the new end, durable before the old one (where the
        // bitmap goes) is overwritten: the file always ends with a footer.
        self.storage.write_all_at(&self.footer.raw, block_end)?;
        self.storage.flush()?;
        if !diff && file_len > data_start {
            // Space past the old end holds stale bytes (a leaked block): dynamic reads
            // ignore the bitmap, so the whole block must read as zeroes.
            self.storage
                .write_zeroes(data_start, file_len.min(block_end) - data_start)?;
        }
        self.storage.write_all_at(data, data_start + in_block)?;
        let mut bm = vec![0u8; usize::try_from(d.bitmap_size).unwrap_or(0)];
        if diff {
            set_bits(&mut bm, first, last);
        } else {
            // As qemu: every sector of a dynamic block is marked present.
            bm.fill(0xff);
        }
        self.storage.write_all_at(&bm, new)?;
        // The BAT entry takes effect in memory; the next flush writes it, after making
        // the data and bitmap durable (`commit_bat`).
        {
            let mut bat = d.bat.write().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = usize::try_from(idx).ok().and_then(|i| bat.get_mut(i)) {
                *slot = sector;
            }
        }
        alloc.pending = Some(match alloc.pending {
            Some((lo, hi)) => (lo.min(idx), hi.max(idx)),
            None => (idx, idx),
        });
        alloc.free = block_end;
        Ok(())
    }

    /// Writes the BAT entries allocated since the last flush: data and bitmaps are made
    /// durable first, then the changed BAT range goes out in one write. A crash before
    /// leaves those blocks unreferenced (space `check` reports as leaked), losing only
    /// unflushed writes. One `fdatasync` per flush instead of one per new block.
    pub(crate) fn commit_bat(&self) -> Result<()> {
        let Some(d) = &self.dynamic else {
            return Ok(());
        };
        let mut alloc = self.lock(d);
        let Some((lo, hi)) = alloc.pending else {
            return Ok(());
        };
        self.storage.flush()?;
        let bytes: Vec<u8> = {
            let bat = d.bat.read().unwrap_or_else(|e| e.into_inner());
            let (a, b) = (usize::try_from(lo), usize::try_from(hi));
            let range = match (a, b) {
                (Ok(a), Ok(b)) => bat.get(a..=b).unwrap_or(&[]),
                _ => &[],
            };
            range.iter().flat_map(|e| e.to_be_bytes()).collect()
        };
        self.storage.write_all_at(&bytes, d.bat_offset + lo * 4)?;
        alloc.pending = None;
        Ok(())
    }

    pub(crate) fn zero_inner(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        let Some(d) = &self.dynamic else {
            return self.storage.write_zeroes(offset, len);
        };
        if self.footer.disk_type == DiskType::Differencing {
            return zero_by_buffer(offset, len, |z, at| self.write_inner(z, at));
        }
        let _alloc = self.lock(self.dyn_state()?);
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let room = d.block_size - pos % d.block_size;
            let n = room.min(end - pos);
            let e = d.entry(pos / d.block_size);
            if e != UNALLOCATED {
                let host = d.data_start(e) + pos % d.block_size;
                d.meta.guard_write(FORMAT, host, n)?;
                self.storage.write_zeroes(host, n)?;
            }
            pos += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::bit;

    #[test]
    fn bits_msb_first() {
        let mut bm = [0u8; 2];
        assert!(set_bits(&mut bm, 1, 3));
        assert_eq!(bm, [0x60, 0]);
        assert!(!set_bits(&mut bm, 1, 2));
        assert!(bit(&bm, 2) && !bit(&bm, 3));
    }
}
