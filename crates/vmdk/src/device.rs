//! [`VmdkDevice`]: the guest view over a VMDK's extents (flat, zero, sparse), with the
//! descriptor's CID bookkeeping and parent (delta disk) reads.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use diskimg_blockio::{
    BackingRef, BlockDevice, CheckReport, CompressedUnits, DeviceInfo, Error, Extent, ExtentKind,
    Holes, HostRun, InfoValue, Layout, Mapping, PackedUnit, PastEof, Preallocation, RepairMode,
    Result, Storage, ZeroFlags, check_range, map_via, read_from_backing, read_via,
};

use crate::descriptor::{Descriptor, random_u32};
use crate::header::SECTOR;
use crate::sparse::{Grain, SparseExtent};

/// What an extent stores.
#[derive(Debug)]
pub(crate) enum ExtentData {
    /// Plain bytes at `offset` in `storage` (FLAT, VMFS).
    Flat {
        /// The extent file.
        storage: Arc<dyn Storage>,
        /// Byte offset of the extent's first sector in the file.
        offset: u64,
    },
    /// Reads as zeroes (ZERO).
    Zero,
    /// A sparse extent (SPARSE, VMFSSPARSE, stream-optimized).
    Sparse(Box<SparseExtent>),
}

/// One extent placed in the guest address space.
#[derive(Debug)]
pub(crate) struct Ext {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// File name as the descriptor gives it.
    pub file: String,
    /// Extent type as the descriptor gives it (empty for a monolithic sparse file).
    pub type_name: String,
    /// Writes refused (RDONLY/NOACCESS line).
    pub read_only: bool,
    /// The data.
    pub data: ExtentData,
}

pub(crate) use crate::cid::DescLocation;

/// An open VMDK image.
#[derive(Debug)]
pub struct VmdkDevice {
    pub(crate) extents: Vec<Ext>,
    pub(crate) size: u64,
    pub(crate) desc: Descriptor,
    pub(crate) desc_loc: Option<DescLocation>,
    pub(crate) read_only: bool,
    pub(crate) closed: diskimg_blockio::Closed,
    pub(crate) backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    /// The backing device's part of the host epoch (`BlockDevice::host_epoch`).
    pub(crate) backing_epoch: diskimg_blockio::BackingEpoch,
    pub(crate) cid: std::sync::atomic::AtomicU32,
    pub(crate) cid_updated: AtomicBool,
}

impl VmdkDevice {
    /// The descriptor's content id (`CID`).
    pub fn cid(&self) -> u32 {
        self.cid.load(Ordering::Acquire)
    }

    /// The parent's expected content id (`parentCID`, 0xffffffff without parent).
    pub fn parent_cid(&self) -> u32 {
        self.desc.parent_cid
    }

    /// The descriptor's `createType`.
    pub fn create_type(&self) -> &str {
        &self.desc.create_type
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn find(&self, pos: u64) -> Result<&Ext> {
        let i = self.extents.partition_point(|e| e.start + e.len <= pos);
        self.extents.get(i).ok_or(Error::OutOfRange {
            offset: pos,
            len: 0,
            size: self.size,
        })
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.closed.check()?;
        if !self.cid_updated.swap(true, Ordering::AcqRel) {
            self.update_cid()?;
        }
        Ok(())
    }

    /// qemu's `vmdk_write_cid` on the first write: a new random CID in the descriptor.
    fn update_cid(&self) -> Result<()> {
        let Some(loc) = &self.desc_loc else {
            return Ok(());
        };
        let cid = random_u32();
        loc.write_cid(cid)?;
        self.cid.store(cid, Ordering::Release);
        Ok(())
    }

    /// Runs `f` over the pieces of `offset..offset+len`: each inside one extent and,
    /// for sparse extents, one grain. `f(ext, offset_in_extent, piece_len, done)`.
    fn for_pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Ext, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let ext = self.find(pos)?;
            let in_ext = pos - ext.start;
            let mut n = (len - done).min(ext.len - in_ext);
            if let ExtentData::Sparse(s) = &ext.data {
                let gb = s.grain_bytes();
                n = n.min(gb - in_ext % gb);
            }
            f(ext, in_ext, n, done)?;
            done += n;
        }
        Ok(())
    }

    fn write_piece(&self, ext: &Ext, in_ext: u64, data: &[u8]) -> Result<()> {
        if ext.read_only {
            return Err(Error::ReadOnly);
        }
        match &ext.data {
            ExtentData::Zero => Err(Error::unsupported("vmdk", "writes to a ZERO extent")),
            ExtentData::Flat { storage, offset } => {
                storage.debug_event(diskimg_blockio::DebugEvent::WriteAio);
                storage.write_all_at(data, offset.saturating_add(in_ext))
            }
            ExtentData::Sparse(s) => {
                let gb = s.grain_bytes();
                let grain = in_ext / gb;
                let in_grain = usize::try_from(in_ext % gb).unwrap_or(usize::MAX);
                let backing = self.backing();
                let gstart = ext.start + grain * gb;
                let fill = |buf: &mut [u8]| read_from_backing(backing.as_deref(), buf, gstart);
                s.write(grain, in_grain, data, &fill)
            }
        }
    }

    /// True when the descriptor is a file of its own (the data lives in extent files).
    fn separate_descriptor(&self) -> bool {
        self.desc_loc.as_ref().is_some_and(|l| l.room.is_none())
    }

    /// The stream-optimized extent holding whole grains `offset..offset + len` (the last
    /// one may be the extent's partial last grain) and the number of the first grain.
    fn stream_grains(&self, offset: u64, len: u64) -> Result<(&SparseExtent, u64)> {
        check_range(offset, len, self.size)?;
        if self.first_stream_extent().is_none() {
            return Err(Error::unsupported(
                "vmdk",
                "compressed writes outside streamOptimized",
            ));
        }
        self.writable()?;
        let ext = self.find(offset)?;
        let ExtentData::Sparse(s) = &ext.data else {
            return Err(Error::unsupported(
                "vmdk",
                "compressed writes to a flat extent",
            ));
        };
        let gb = s.grain_bytes();
        let in_ext = offset - ext.start;
        let whole = len.is_multiple_of(gb) || in_ext + len == ext.len;
        if !in_ext.is_multiple_of(gb) || !whole || len == 0 || in_ext + len > ext.len {
            return Err(Error::invalid("compressed writes must cover whole grains"));
        }
        Ok((s, in_ext / gb))
    }

    fn first_stream_extent(&self) -> Option<&SparseExtent> {
        match self.extents.first().map(|e| &e.data) {
            Some(ExtentData::Sparse(s)) if s.compressed => Some(s),
            _ => None,
        }
    }
}

/// Plain bytes at `at` of an extent file; bytes past its end read as zeroes.
fn host_run(storage: &Arc<dyn Storage>, at: u64) -> HostRun<'_> {
    HostRun::new(storage.as_ref(), at).past_eof(PastEof::Zero)
}

/// Each extent answers for its range: ZERO extents read as zeroes, flat extents are host
/// runs, sparse extents are looked up one grain at a time (compressed grains are
/// inflated by [`Layout::read_special`]). Host bytes past the end of an extent file
/// read as zeroes, as qemu's file layer returns them.
impl Layout for VmdkDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn lookup(&self, offset: u64, max: u64) -> Result<(Mapping<'_>, u64)> {
        let ext = self.find(offset)?;
        let in_ext = offset - ext.start;
        let n = max.min(ext.len - in_ext);
        match &ext.data {
            ExtentData::Zero => Ok((Mapping::Zero { host: None }, n)),
            // As qemu (which recurses into the file), holes of a flat extent file map as
            // data that reads as zeroes.
            ExtentData::Flat { storage, offset } => {
                let at = offset.checked_add(in_ext).ok_or_else(|| {
                    Error::corrupt_unplaced("vmdk", "flat extent offset overflows")
                })?;
                Ok((
                    Mapping::Host(host_run(storage, at).holes(Holes::DataZero)),
                    n,
                ))
            }
            ExtentData::Sparse(s) => {
                let gb = s.grain_bytes();
                let in_grain = in_ext % gb;
                let m = match s.lookup(in_ext / gb)? {
                    Grain::Unallocated => Mapping::Unallocated { host: None },
                    Grain::Zero => Mapping::Zero { host: None },
                    Grain::Data(h) => {
                        Mapping::Host(host_run(&s.storage, h.saturating_add(in_grain)))
                    }
                    Grain::Compressed(h) => Mapping::Special {
                        kind: ExtentKind::Compressed,
                        token: h,
                    },
                };
                Ok((m, n.min(gb - in_grain)))
            }
        }
    }

    /// Inflates the compressed grain at host offset `token` and copies out `buf`.
    fn read_special(&self, token: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let ext = self.find(offset)?;
        let ExtentData::Sparse(s) = &ext.data else {
            return Err(Error::internal(
                "vmdk: compressed run outside a sparse extent",
            ));
        };
        let in_grain = (offset - ext.start) % s.grain_bytes();
        if in_grain == 0 && buf.len() as u64 == s.grain_bytes() {
            return s.read_compressed_into(token, buf);
        }
        let g = s.read_compressed(token)?;
        let i = usize::try_from(in_grain).unwrap_or(usize::MAX);
        let src = g
            .get(i..i.saturating_add(buf.len()))
            .ok_or_else(|| Error::corrupt("vmdk", "short grain", token))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        VmdkDevice::backing(self)
    }
}

impl BlockDevice for VmdkDevice {
    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new("vmdk", self.size);
        info.read_only = self.read_only;
        if let Some(ExtentData::Sparse(s)) = self.extents.first().map(|e| &e.data) {
            info.cluster_size = Some(s.grain_bytes());
        }
        info.backing = self
            .desc
            .parent_hint
            .as_ref()
            .map(|p| BackingRef::new(p.clone(), Some("vmdk".to_string())));
        let extents = self
            .extents
            .iter()
            .map(|e| {
                // qemu's ImageInfoSpecificVmdk extent order.
                let mut m = Vec::new();
                if let ExtentData::Sparse(s) = &e.data
                    && s.compressed
                {
                    m.push(("compressed".to_string(), InfoValue::Bool(true)));
                }
                m.push((
                    "virtual-size".to_string(),
                    InfoValue::Int(i64::try_from(e.len).unwrap_or(i64::MAX)),
                ));
                m.push(("filename".to_string(), InfoValue::Str(e.file.clone())));
                if let ExtentData::Sparse(s) = &e.data {
                    m.push((
                        "cluster-size".to_string(),
                        InfoValue::Int(i64::try_from(s.grain_bytes()).unwrap_or(i64::MAX)),
                    ));
                }
                m.push(("format".to_string(), InfoValue::Str(e.type_name.clone())));
                InfoValue::Map(m)
            })
            .collect();
        info.format_specific = Some((
            "vmdk",
            vec![
                ("cid".to_string(), InfoValue::Int(i64::from(self.cid()))),
                (
                    "parent-cid".to_string(),
                    InfoValue::Int(i64::from(self.desc.parent_cid)),
                ),
                (
                    "create-type".to_string(),
                    InfoValue::Str(self.desc.create_type.clone()),
                ),
                ("extents".to_string(), InfoValue::List(extents)),
            ],
        ));
        info
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_via(self, buf, offset)
    }

    fn walk_runs(&self, offset: u64, len: u64, f: &mut diskimg_blockio::RunFn<'_>) -> Result<bool> {
        diskimg_blockio::walk(self, offset, len, f)
    }

    /// A constant, plus the backing's count: host bytes a walk reported stay that guest
    /// range's home while the image is open. Grains are only appended (the extent's end
    /// moves up, `SparseExtent::alloc`), a zeroed grain's old sectors leak rather than
    /// being reused, flat extents map every guest byte to one fixed place, discard does
    /// nothing and the image cannot be resized.
    fn host_epoch(&self) -> Option<u64> {
        self.backing_epoch.host_epoch(0, || self.backing())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.writable()?;
        self.for_pieces(offset, buf.len() as u64, |ext, in_ext, n, done| {
            let d = usize::try_from(done).unwrap_or(usize::MAX);
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            let piece = buf
                .get(d..d.saturating_add(n))
                .ok_or_else(|| Error::internal("write piece out of buffer"))?;
            self.write_piece(ext, in_ext, piece)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        check_range(offset, len, self.size)?;
        self.writable()?;
        let has_backing = self.backing().is_some();
        self.for_pieces(offset, len, |ext, in_ext, n, _| {
            if ext.read_only {
                return Err(Error::ReadOnly);
            }
            match &ext.data {
                ExtentData::Zero => Ok(()),
                ExtentData::Flat { storage, offset } => {
                    storage.write_zeroes(offset.saturating_add(in_ext), n)
                }
                ExtentData::Sparse(s) => {
                    let gb = s.grain_bytes();
                    let grain = in_ext / gb;
                    if in_ext % gb == 0
                        && (n == gb || in_ext + n == ext.len)
                        && s.zero_grain(grain)?
                    {
                        return Ok(());
                    }
                    match s.lookup(grain)? {
                        Grain::Zero => Ok(()),
                        Grain::Unallocated if !has_backing => Ok(()),
                        _ => {
                            let z = vec![0u8; usize::try_from(n).unwrap_or(0)];
                            self.write_piece(ext, in_ext, &z)
                        }
                    }
                }
            }
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // A hint qemu's vmdk ignores too; a closed device refuses it as every format.
        self.closed.check()?;
        check_range(offset, len, self.size)
    }

    fn resize(&self, _new_size: u64, _prealloc: Preallocation, _shrink: bool) -> Result<()> {
        // As qemu's vmdk: no resizing; a closed device says so first.
        self.closed.check()?;
        Err(Error::unsupported("vmdk", "resizing"))
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
        if let Some(loc) = &self.desc_loc {
            loc.storage.flush()?;
        }
        for e in &self.extents {
            match &e.data {
                ExtentData::Flat { storage, .. } => storage.flush()?,
                ExtentData::Sparse(s) => s.storage.flush()?,
                ExtentData::Zero => {}
            }
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        map_via(self, offset, len)
    }

    /// The extent files of an image with a separate descriptor (a monolithic file holds
    /// its own data).
    fn host_files(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        if self.separate_descriptor() {
            for e in &self.extents {
                if !matches!(e.data, ExtentData::Zero) && !names.contains(&e.file) {
                    names.push(e.file.clone());
                }
            }
        }
        names
    }

    fn map_file(&self, offset: u64) -> usize {
        if !self.separate_descriptor() {
            return 0;
        }
        let Ok(ext) = self.find(offset) else {
            return 0;
        };
        self.host_files()
            .iter()
            .position(|f| *f == ext.file)
            .map_or(0, |i| i + 1)
    }

    fn compressed_write_granularity(&self) -> Option<u64> {
        self.first_stream_extent().map(SparseExtent::grain_bytes)
    }

    /// A streamOptimized image takes only whole compressed grains (qemu's
    /// `needs_compressed_writes`).
    fn needs_compressed_writes(&self) -> bool {
        self.first_stream_extent().is_some()
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let (s, first) = self.stream_grains(offset, buf.len() as u64)?;
        s.write_compressed(first, buf)
    }

    fn compress_units(&self, buf: &[u8], offset: u64) -> Result<CompressedUnits> {
        let (s, first) = self.stream_grains(offset, buf.len() as u64)?;
        let units = s.compress_grains(first, buf)?;
        Ok(CompressedUnits {
            offset,
            len: buf.len() as u64,
            units: units.into_iter().map(PackedUnit::Compressed).collect(),
        })
    }

    fn write_compressed_units(&self, units: CompressedUnits) -> Result<()> {
        let (s, first) = self.stream_grains(units.offset, units.len)?;
        units.unit_ranges(s.grain_bytes())?;
        let records = units
            .units
            .into_iter()
            .map(|u| match u {
                PackedUnit::Compressed(r) => Ok(r),
                PackedUnit::Plain(_) => Err(Error::invalid(
                    "vmdk: streamOptimized grains are always compressed",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        s.append_records(first, &records)
    }

    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) -> Result<()> {
        if let Some(b) = &backing
            && let Some(parent) = b.as_any().downcast_ref::<VmdkDevice>()
            && parent.cid() != self.desc.parent_cid
        {
            return Err(Error::invalid(format!(
                "Parent CID mismatch: image expects parentCID={:x}, parent has CID={:x}",
                self.desc.parent_cid,
                parent.cid()
            )));
        }
        let present = backing.is_some();
        let old = std::mem::replace(
            &mut *self
                .backing
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            backing,
        );
        self.backing_epoch.replaced(old.as_deref(), present);
        Ok(())
    }

    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing()
    }

    fn check(&self, _repair: RepairMode) -> Result<CheckReport> {
        if _repair != RepairMode::None {
            return Err(Error::unsupported("vmdk", "checks"));
        }
        let mut report = CheckReport::default();
        for e in &self.extents {
            if let ExtentData::Sparse(s) = &e.data {
                s.check(e.start / SECTOR, &mut report)?;
            }
        }
        Ok(report)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
