//! The block map (`paBlocks` in VirtualBox): one little-endian `u32` per guest block,
//! giving the index of the block's data in the data area, or `0xffffffff` (never
//! allocated) / `0xfffffffe` (discarded, reads as zeroes).
//!
//! [`Meta`] holds the parsed header, the raw bytes before the block map (so unknown header
//! fields survive), the raw block map and a bitset of data indices in use. All metadata
//! updates go through [`Meta::commit`], which writes the header and the changed block map
//! entries **in one storage write** starting at byte 0: the header's allocated count and
//! the entries can never disagree after a crash, which is what `qemu-img check` verifies.

use std::sync::Arc;

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Limits, Result, Storage};

use crate::header::{BLOCK_SIZE, FORMAT, Header, SECTOR, VERSION_1_0};

/// A never-allocated block (`VDI_IMAGE_BLOCK_FREE`).
pub(crate) const UNALLOCATED: u32 = 0xffff_ffff;
/// A discarded block: reads as zeroes (`VDI_IMAGE_BLOCK_ZERO`).
pub(crate) const DISCARDED: u32 = 0xffff_fffe;
/// Largest block map offset for which diskimg keeps the bytes before the map in memory
/// and writes metadata atomically; images with a larger gap are opened read-only.
const PREFIX_MAX: u64 = 1 << 20;

/// True when a block map entry points at data.
pub(crate) fn is_allocated(entry: u32) -> bool {
    entry < DISCARDED
}

/// Rounds `v` up to a multiple of the sector size.
pub(crate) fn sector_align(v: u64) -> Option<u64> {
    v.checked_add(SECTOR - 1).map(|x| x / SECTOR * SECTOR)
}

/// The metadata of an open image.
#[derive(Debug)]
pub(crate) struct Meta {
    /// Parsed header (`allocated` is kept equal to the number of allocated entries once
    /// the image has been written).
    pub header: Header,
    /// Bytes `[0, offset_bmap)`: the header and whatever follows it.
    pub prefix: Vec<u8>,
    /// The block map region, little-endian entries (plus sector padding).
    pub bmap: Vec<u8>,
    /// Bitset of data indices in use (indices below `header.blocks`).
    used: Vec<u64>,
    /// Highest index in use.
    max_used: Option<u64>,
    /// Allocated entries counted in the map.
    pub counted: u64,
    /// Why writes are refused, if they are.
    pub write_block: Option<&'static str>,
    /// Highest block whose new map entry is only in memory (written at the next flush).
    pub pending_upto: Option<u64>,
}

impl Meta {
    /// Reads the header and block map from `storage`.
    pub(crate) fn load(storage: &Arc<dyn Storage>, limits: &Limits) -> Result<Meta> {
        let file_len = storage.len()?;
        let head_len = usize::try_from(file_len.min(512)).unwrap_or(512);
        let mut head = vec![0u8; head_len];
        storage.read_exact_at(&mut head, 0)?;
        let header = Header::parse(&head)?;
        let entries_len = header
            .blocks
            .checked_mul(4)
            .ok_or_else(|| Error::corrupt(FORMAT, "block map too large", 384))?;
        let region_len = if header.version == VERSION_1_0 {
            entries_len
        } else {
            sector_align(entries_len).unwrap_or(entries_len)
        };
        let bmap_end = header
            .offset_bmap
            .checked_add(entries_len)
            .ok_or_else(|| Error::corrupt(FORMAT, "block map offset overflow", 340))?;
        if bmap_end > file_len {
            return Err(Error::corrupt(
                FORMAT,
                "block map beyond the end of the file",
                header.offset_bmap,
            ));
        }
        // Only now, with its entries known to lie in the file (the padding of the last
        // sector may not), is the map allocated: memory proportional to the file.
        let mut bmap = limits.alloc("vdi block map", region_len)?;
        let avail = usize::try_from(file_len.saturating_sub(header.offset_bmap).min(region_len))
            .map_err(|_| Error::internal("vdi block map larger than its allocation"))?;
        if let Some(dst) = bmap.get_mut(..avail) {
            storage.read_exact_at(dst, header.offset_bmap)?;
        }
        let mut write_block = None;
        let mut prefix = Vec::new();
        if header.offset_bmap > PREFIX_MAX {
            write_block = Some("block map too far from the header");
        } else if header.offset_bmap < header.header_end() {
            write_block = Some("block map overlaps the header");
        } else if header.offset_data < header.offset_bmap.saturating_add(region_len) {
            write_block = Some("data area overlaps the block map");
        } else {
            prefix = vec![0u8; usize::try_from(header.offset_bmap).unwrap_or(0)];
            storage.read_exact_at(&mut prefix, 0)?;
        }
        let words = header.blocks.div_ceil(64);
        let used = limits.alloc_elems::<u64>("vdi block bitmap", words, 8)?;
        let mut meta = Meta {
            header,
            prefix,
            bmap,
            used,
            max_used: None,
            counted: 0,
            write_block,
            pending_upto: None,
        };
        if !meta.rebuild_used() && meta.write_block.is_none() {
            meta.write_block = Some("block map has duplicate or out-of-range entries");
        }
        Ok(meta)
    }

    /// Recomputes the used bitset and count; false if an entry is out of range or
    /// used twice.
    pub(crate) fn rebuild_used(&mut self) -> bool {
        self.used.fill(0);
        self.max_used = None;
        self.counted = 0;
        let mut clean = true;
        for g in 0..self.header.blocks {
            let e = self.entry(g);
            if !is_allocated(e) {
                continue;
            }
            self.counted += 1;
            let idx = u64::from(e);
            if idx >= self.header.blocks || self.is_used(idx) {
                clean = false;
                continue;
            }
            self.set_used(idx, true);
        }
        clean
    }

    /// The entry for guest block `g` (unallocated when out of range).
    pub(crate) fn entry(&self, g: u64) -> u32 {
        usize::try_from(g)
            .ok()
            .and_then(|g| g.checked_mul(4))
            .and_then(|o| self.bmap.le_u32(o))
            .unwrap_or(UNALLOCATED)
    }

    /// Sets the entry for guest block `g`.
    pub(crate) fn set_entry(&mut self, g: u64, v: u32) -> Result<()> {
        let ok = usize::try_from(g)
            .ok()
            .and_then(|g| g.checked_mul(4))
            .is_some_and(|o| self.bmap.put_le_u32(o, v));
        if ok {
            Ok(())
        } else {
            Err(Error::internal("vdi block index out of range"))
        }
    }

    fn is_used(&self, idx: u64) -> bool {
        usize::try_from(idx / 64)
            .ok()
            .and_then(|w| self.used.get(w))
            .is_some_and(|w| w & (1 << (idx % 64)) != 0)
    }

    fn set_used(&mut self, idx: u64, on: bool) {
        if let Some(w) = usize::try_from(idx / 64)
            .ok()
            .and_then(|w| self.used.get_mut(w))
        {
            if on {
                *w |= 1 << (idx % 64);
                self.max_used = Some(self.max_used.map_or(idx, |m| m.max(idx)));
            } else {
                *w &= !(1 << (idx % 64));
            }
        }
    }

    /// Reserves a free data index: the one after the highest in use (what qemu picks on a
    /// clean image), else the lowest free one. Indices left over by a crash (data written,
    /// map not updated) are reused.
    pub(crate) fn alloc_index(&mut self) -> Result<u64> {
        let limit = self.header.blocks;
        let next = self.max_used.map_or(0, |m| m.saturating_add(1));
        let pick = if next < limit && !self.is_used(next) {
            Some(next)
        } else {
            (0..limit).find(|&i| !self.is_used(i))
        };
        let idx = pick.ok_or_else(|| Error::corrupt_unplaced(FORMAT, "no free data block"))?;
        self.set_used(idx, true);
        Ok(idx)
    }

    /// Releases an index reserved by [`Meta::alloc_index`] that was never committed.
    pub(crate) fn unreserve(&mut self, idx: u64) {
        self.set_used(idx, false);
        self.max_used = None;
        for w in (0..self.used.len()).rev() {
            if let Some(&bits) = self.used.get(w)
                && bits != 0
            {
                self.max_used = Some(w as u64 * 64 + 63 - u64::from(bits.leading_zeros()));
                break;
            }
        }
    }

    /// Host offset of data index `idx`.
    pub(crate) fn host_offset(&self, idx: u64) -> Result<u64> {
        idx.checked_mul(BLOCK_SIZE)
            .and_then(|o| o.checked_add(self.header.offset_data))
            .ok_or_else(|| Error::corrupt_unplaced(FORMAT, "data block offset overflow"))
    }

    /// Writes the header and the block map up to the sector holding entry `upto`
    /// (`None`: header only) in one storage write from byte 0. The header's allocated
    /// count is set to the number of allocated entries first.
    pub(crate) fn commit(&mut self, storage: &dyn Storage, upto: Option<u64>) -> Result<()> {
        if let Some(why) = self.write_block {
            return Err(Error::unsupported(
                FORMAT,
                format!("writing this image: {why}"),
            ));
        }
        self.header.allocated = self.counted;
        self.header.store(&mut self.prefix)?;
        let map_bytes = match upto {
            None => 0,
            Some(g) => {
                let end = g
                    .checked_add(1)
                    .and_then(|n| n.checked_mul(4))
                    .and_then(|e| e.checked_add(self.header.offset_bmap))
                    .and_then(sector_align)
                    .map(|e| e - self.header.offset_bmap)
                    .ok_or_else(|| Error::internal("vdi block index out of range"))?;
                usize::try_from(end.min(self.bmap.len() as u64))
                    .map_err(|_| Error::internal("vdi block map too large"))?
            }
        };
        if map_bytes == 0 {
            let end = usize::try_from(self.header.header_end()).unwrap_or(0);
            let head = self.prefix.get(..end).unwrap_or(&self.prefix);
            return storage.write_all_at(head, 0);
        }
        let map = self.bmap.get(..map_bytes).unwrap_or(&self.bmap);
        let mut buf = self.prefix.clone();
        buf.extend_from_slice(map);
        storage.write_all_at(&buf, 0)
    }

    /// Replaces the block map and header geometry after a resize, recounting entries.
    pub(crate) fn replace_map(
        &mut self,
        bmap: Vec<u8>,
        blocks: u64,
        offset_data: u64,
        limits: &Limits,
    ) -> Result<()> {
        self.used = limits.alloc_elems::<u64>("vdi block bitmap", blocks.div_ceil(64), 8)?;
        self.bmap = bmap;
        self.header.blocks = blocks;
        self.header.offset_data = offset_data;
        if !self.rebuild_used() {
            self.write_block = Some("block map has duplicate or out-of-range entries");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskimg_blockio::MemStorage;

    fn image(entries: &[u32], allocated: u32) -> Arc<dyn Storage> {
        let blocks = entries.len() as u64;
        let od = 512 + sector_align(blocks * 4).unwrap();
        let mut b = crate::header::new_header_sector(1, blocks << 20, blocks, od)
            .unwrap()
            .to_vec();
        assert!(b.put_le_u32(388, allocated));
        for e in entries {
            b.extend_from_slice(&e.to_le_bytes());
        }
        b.resize(usize::try_from(od).unwrap(), 0);
        Arc::new(MemStorage::from_vec(b))
    }

    #[test]
    fn allocation_follows_qemu_and_reuses_leaks() {
        let s = image(&[0, UNALLOCATED, 1, UNALLOCATED], 2);
        let mut m = Meta::load(&s, &Limits::default()).unwrap();
        assert!(m.write_block.is_none());
        assert_eq!(m.counted, 2);
        let i = m.alloc_index().unwrap();
        assert_eq!(i, 2);
        m.unreserve(i);
        assert_eq!(m.alloc_index().unwrap(), 2);
        assert_eq!(m.alloc_index().unwrap(), 3);
        assert!(m.alloc_index().is_err());
    }

    #[test]
    fn duplicates_block_writes() {
        let s = image(&[0, 0, UNALLOCATED, 9], 3);
        let m = Meta::load(&s, &Limits::default()).unwrap();
        assert!(m.write_block.is_some());
        assert_eq!(m.counted, 3);
    }
}
