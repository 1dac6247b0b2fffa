//! The VHD [`BlockDevice`]: reads, map, info, and the trait glue for writes
//! (implemented in `write.rs`).

use std::any::Any;
use std::sync::{Arc, Mutex, RwLock};

use diskimg_blockio::{
    BackingRef, BlockDevice, CheckReport, DeviceInfo, Error, Extent, ExtentKind, MetaRanges,
    RepairMode, Result, Storage, ZeroFlags, check_range, map_host_run, read_from_backing,
};

use crate::FORMAT;
use crate::footer::{DiskType, Footer};
use crate::header::DynHeader;
use crate::open::UNALLOCATED;

/// Allocation state of a dynamic disk, under the write lock.
#[derive(Debug)]
pub(crate) struct Alloc {
    /// Host offset where the next block goes (qemu's `free_data_block_offset`).
    pub(crate) free: u64,
    /// Lowest and highest BAT index changed in memory but not yet on disk (written by
    /// the next flush, after the blocks' data).
    pub(crate) pending: Option<(u64, u64)>,
}

/// State of a dynamic or differencing disk.
#[derive(Debug)]
pub(crate) struct Dynamic {
    pub(crate) header: DynHeader,
    /// The header bytes as read (for the checksum check).
    pub(crate) raw_header: Vec<u8>,
    pub(crate) block_size: u64,
    pub(crate) bitmap_size: u64,
    pub(crate) bat_offset: u64,
    /// The BAT, in sectors (`UNALLOCATED` = none).
    pub(crate) bat: RwLock<Vec<u32>>,
    /// Serialises writers; holds the allocation pointer.
    pub(crate) alloc: Mutex<Alloc>,
    /// Footer copy, dynamic header, BAT and parent locator data: no data write may land
    /// there.
    pub(crate) meta: MetaRanges,
}

impl Dynamic {
    /// The BAT entry for block `idx`.
    pub(crate) fn entry(&self, idx: u64) -> u32 {
        let bat = self.bat.read().unwrap_or_else(|e| e.into_inner());
        usize::try_from(idx)
            .ok()
            .and_then(|i| bat.get(i).copied())
            .unwrap_or(UNALLOCATED)
    }

    /// Host offset of the first data byte of the block whose BAT entry is `e`.
    pub(crate) fn data_start(&self, e: u32) -> u64 {
        u64::from(e) * 512 + self.bitmap_size
    }
}

/// An open VHD image (fixed, dynamic or differencing).
#[derive(Debug)]
pub struct VhdDevice {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) read_only: bool,
    pub(crate) size: u64,
    pub(crate) footer: Footer,
    pub(crate) dynamic: Option<Dynamic>,
    pub(crate) backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    pub(crate) backing_ref: Option<BackingRef>,
}

/// Reads the sector bitmap of the block whose BAT entry is `e`.
pub(crate) fn read_bitmap(storage: &dyn Storage, d: &Dynamic, e: u32) -> Result<Vec<u8>> {
    let mut bm = vec![0u8; usize::try_from(d.bitmap_size).unwrap_or(0)];
    storage.read_exact_at(&mut bm, u64::from(e) * 512)?;
    Ok(bm)
}

/// True when sector `s` (within its block) is marked present (MSB first).
pub(crate) fn bit(bm: &[u8], s: u64) -> bool {
    usize::try_from(s / 8)
        .ok()
        .and_then(|i| bm.get(i))
        .is_some_and(|b| b & (0x80 >> (s % 8)) != 0)
}

impl VhdDevice {
    /// The disk type.
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// The footer's unique id (a differencing child stores it as its parent id).
    pub fn uuid(&self) -> [u8; 16] {
        self.footer.uuid
    }

    /// The parent's unique id, for a differencing disk.
    pub fn parent_uuid(&self) -> Option<[u8; 16]> {
        match (&self.dynamic, self.footer.disk_type) {
            (Some(d), DiskType::Differencing) => Some(d.header.parent_uuid),
            _ => None,
        }
    }

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    pub(crate) fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn is_diff(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }

    /// Reads `buf` from within one block of a dynamic/differencing disk.
    fn read_in_block(&self, d: &Dynamic, buf: &mut [u8], off: u64) -> Result<()> {
        let idx = off / d.block_size;
        let in_block = off % d.block_size;
        let e = d.entry(idx);
        if e == UNALLOCATED {
            if self.is_diff() {
                return read_from_backing(self.backing().as_deref(), buf, off);
            }
            buf.fill(0);
            return Ok(());
        }
        let host = d.data_start(e) + in_block;
        if !self.is_diff() {
            // As qemu: the bitmap of a dynamic disk is not consulted for reads.
            return self.storage.read_exact_at(buf, host);
        }
        let bm = read_bitmap(self.storage.as_ref(), d, e)?;
        let backing = self.backing();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = in_block + done as u64;
            let present = bit(&bm, pos / 512);
            let mut end = (pos / 512 + 1) * 512;
            let stop = in_block + buf.len() as u64;
            while end < stop && bit(&bm, end / 512) == present {
                end += 512;
            }
            let n = usize::try_from(end.min(stop) - pos).unwrap_or(0);
            let chunk = buf
                .get_mut(done..done + n)
                .ok_or(Error::invalid("read chunk out of range"))?;
            if present {
                self.storage.read_exact_at(chunk, host + done as u64)?;
            } else {
                read_from_backing(backing.as_deref(), chunk, off + done as u64)?;
            }
            done += n;
        }
        Ok(())
    }

    fn map_fixed(&self, offset: u64, len: u64) -> Result<Extent> {
        map_host_run(self.storage.as_ref(), offset, offset, len)
    }

    fn map_dynamic(&self, d: &Dynamic, offset: u64, len: u64) -> Result<Extent> {
        let end = offset + len;
        let idx = offset / d.block_size;
        let block_end = (idx + 1).saturating_mul(d.block_size);
        let e = d.entry(idx);
        if e == UNALLOCATED {
            let mut stop = block_end;
            while stop < end && d.entry(stop / d.block_size) == UNALLOCATED {
                stop = stop.saturating_add(d.block_size);
            }
            let kind = if self.is_diff() {
                ExtentKind::Unallocated
            } else {
                ExtentKind::Zero { offset: None }
            };
            return Ok(Extent {
                offset,
                len: stop.min(end) - offset,
                kind,
            });
        }
        let host = d.data_start(e) + offset % d.block_size;
        if !self.is_diff() {
            return Ok(Extent {
                offset,
                len: block_end.min(end) - offset,
                kind: ExtentKind::Data { offset: Some(host) },
            });
        }
        let bm = read_bitmap(self.storage.as_ref(), d, e)?;
        let in_block = offset % d.block_size;
        let present = bit(&bm, in_block / 512);
        let mut stop = (in_block / 512 + 1) * 512;
        while stop < d.block_size && bit(&bm, stop / 512) == present {
            stop += 512;
        }
        let stop = (idx * d.block_size + stop).min(end);
        let kind = if present {
            ExtentKind::Data { offset: Some(host) }
        } else {
            ExtentKind::Unallocated
        };
        Ok(Extent {
            offset,
            len: stop - offset,
            kind,
        })
    }
}

impl Drop for VhdDevice {
    /// Writes pending BAT entries (errors are ignored: flush or close first to see them).
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.commit_bat();
        }
    }
}

impl BlockDevice for VhdDevice {
    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new(FORMAT, self.size);
        info.read_only = self.read_only;
        info.cluster_size = self.dynamic.as_ref().map(|d| d.block_size);
        info.backing = self.backing_ref.clone();
        info
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let Some(d) = &self.dynamic else {
            return self.storage.read_exact_at(buf, offset);
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let room = d.block_size - pos % d.block_size;
            let n = usize::try_from(room.min((buf.len() - done) as u64)).unwrap_or(0);
            let chunk = buf
                .get_mut(done..done + n)
                .ok_or(Error::invalid("read chunk out of range"))?;
            self.read_in_block(d, chunk, pos)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        self.write_inner(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        self.zero_inner(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        self.zero_inner(offset, len)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.commit_bat()?;
        self.storage.flush()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Err(Error::invalid("map of an empty range"));
        }
        match &self.dynamic {
            None => self.map_fixed(offset, len),
            Some(d) => self.map_dynamic(d, offset, len),
        }
    }

    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) -> Result<()> {
        if backing.is_some() && !self.is_diff() {
            return Err(Error::unsupported(
                FORMAT,
                "backing files (only differencing disks have a parent)",
            ));
        }
        // A VHD parent must be the VHD the child was made from (its unique id), as
        // Hyper-V insists, whichever locator named it: a file of another format cannot
        // prove it, so it is refused (no locator can make us read an arbitrary file).
        if let Some(b) = backing.as_ref() {
            let Some(parent) = b.as_any().downcast_ref::<VhdDevice>() else {
                return Err(Error::invalid(
                    "the parent of a differencing VHD must be a VHD (whose unique id it records)",
                ));
            };
            if self.parent_uuid() != Some(parent.uuid()) {
                return Err(Error::invalid(
                    "the parent VHD's unique id does not match the differencing disk's parent id",
                ));
            }
        }
        *self.backing.write().unwrap_or_else(|e| e.into_inner()) = backing;
        Ok(())
    }

    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing()
    }

    fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        crate::check::check(self, repair)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
