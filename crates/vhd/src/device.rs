//! The VHD [`BlockDevice`]: reads, map, info, and the trait glue for writes
//! (implemented in `write.rs`).

use std::any::Any;
use std::cell::RefCell;
use std::sync::{Arc, Mutex, RwLock};

use diskimg_blockio::{
    BackingRef, BlockDevice, CheckReport, DeviceInfo, Error, Extent, Holes, HostRun, Layout,
    Mapping, MetaRanges, Preallocation, RepairMode, Result, Storage, ZeroFlags, check_range,
    map_via, read_via,
};

use crate::footer::FORMAT;
use crate::footer::{DiskType, Footer};
use crate::header::DynHeader;
use crate::header::UNALLOCATED;

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
    pub(crate) closed: diskimg_blockio::Closed,
    pub(crate) size: u64,
    pub(crate) footer: Footer,
    pub(crate) dynamic: Option<Dynamic>,
    pub(crate) backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    /// The backing device's part of the host epoch (`BlockDevice::host_epoch`).
    pub(crate) backing_epoch: diskimg_blockio::BackingEpoch,
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
            self.closed.check()
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

    fn view(&self) -> View<'_> {
        View {
            dev: self,
            bitmap: RefCell::new(None),
        }
    }
}

/// One request's view of the disk, for [`read_via`] and [`map_via`]; keeps the last
/// sector bitmap it read (a differencing block's runs share it).
struct View<'a> {
    dev: &'a VhdDevice,
    bitmap: RefCell<Option<(u32, Vec<u8>)>>,
}

impl View<'_> {
    /// Whether sector `sector` of the block at BAT entry `e` is present, and the end
    /// (in bytes within the block, at most `limit`) of the run of sectors alike.
    fn bitmap_run(&self, d: &Dynamic, e: u32, in_block: u64, limit: u64) -> Result<(bool, u64)> {
        let mut cache = self.bitmap.borrow_mut();
        if cache.as_ref().is_none_or(|(at, _)| *at != e) {
            *cache = Some((e, read_bitmap(self.dev.storage.as_ref(), d, e)?));
        }
        let bm = cache.as_ref().map(|(_, bm)| bm.as_slice()).unwrap_or(&[]);
        let present = bit(bm, in_block / 512);
        let mut stop = (in_block / 512 + 1) * 512;
        while stop < limit && bit(bm, stop / 512) == present {
            stop += 512;
        }
        Ok((present, stop.min(limit)))
    }
}

impl Layout for View<'_> {
    fn size(&self) -> u64 {
        self.dev.size
    }

    /// A fixed disk is one host run (holes map as zeroes). A dynamic disk's unallocated
    /// blocks read as zeroes, a differencing disk's from its parent; an allocated block
    /// of a differencing disk is split by its sector bitmap (present: here; absent: the
    /// parent), a dynamic disk's is read whole (as qemu, its bitmap is not consulted).
    fn lookup(&self, offset: u64, max: u64) -> Result<(Mapping<'_>, u64)> {
        let storage = self.dev.storage.as_ref();
        let Some(d) = &self.dev.dynamic else {
            return Ok((
                Mapping::Host(HostRun::new(storage, offset).holes(Holes::DataZero)),
                max,
            ));
        };
        let end = offset.saturating_add(max);
        let (idx, in_block) = (offset / d.block_size, offset % d.block_size);
        let block_start = offset - in_block;
        let block_end = block_start.saturating_add(d.block_size);
        let diff = self.dev.is_diff();
        let e = d.entry(idx);
        if e == UNALLOCATED {
            let mut stop = block_end;
            while stop < end && d.entry(stop / d.block_size) == UNALLOCATED {
                stop = stop.saturating_add(d.block_size);
            }
            let m = if diff {
                Mapping::Unallocated { host: None }
            } else {
                Mapping::Zero { host: None }
            };
            return Ok((m, stop.min(end) - offset));
        }
        let host = HostRun::new(storage, d.data_start(e) + in_block);
        if !diff {
            return Ok((Mapping::Host(host), block_end.min(end) - offset));
        }
        let limit = (end - block_start).min(d.block_size);
        let (present, stop) = self.bitmap_run(d, e, in_block, limit)?;
        let m = if present {
            Mapping::Host(host)
        } else {
            Mapping::Unallocated { host: None }
        };
        Ok((m, block_start + stop - offset))
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.dev.backing()
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
        read_via(&self.view(), buf, offset)
    }

    fn walk_runs(&self, offset: u64, len: u64, f: &mut diskimg_blockio::RunFn<'_>) -> Result<bool> {
        diskimg_blockio::walk(&self.view(), offset, len, f)
    }

    /// A constant, plus the parent's count: host bytes a walk reported stay that guest
    /// range's home while the image is open. A fixed disk maps guest byte x to host byte
    /// x; a dynamic one appends new blocks past every used one (`write.rs`) and never
    /// clears a BAT entry (zero writes and discards write zeroes in place); a repair cuts
    /// only the unused tail; the image cannot be resized.
    fn host_epoch(&self) -> Option<u64> {
        self.backing_epoch.host_epoch(0, || self.backing())
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

    fn resize(&self, _new_size: u64, _prealloc: Preallocation, _shrink: bool) -> Result<()> {
        // As qemu's vpc: no resizing; a closed device says so first, as every format.
        self.closed.check()?;
        Err(Error::unsupported(FORMAT, "resizing"))
    }

    fn close(&self) -> Result<()> {
        // One shared meaning (blockio::Closed): later writes are refused, a second
        // close does nothing.
        self.closed.close_with(self.read_only, || self.flush())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.commit_bat()?;
        self.storage.flush()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        map_via(&self.view(), offset, len)
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
        let present = backing.is_some();
        let old = std::mem::replace(
            &mut *self.backing.write().unwrap_or_else(|e| e.into_inner()),
            backing,
        );
        self.backing_epoch.replaced(old.as_deref(), present);
        Ok(())
    }

    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing()
    }

    fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        if repair != RepairMode::None {
            // A repair writes: refused after close, as every write.
            self.closed.check()?;
        }
        crate::check::check(self, repair)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
