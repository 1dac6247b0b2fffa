//! Sparse extents (hosted `KDMV`, stream-optimized, ESX `COWD`): the grain directory,
//! grain tables and grain allocation (VMware "Virtual Disk Format 5.0" §"Grain Directory
//! and Grain Table", §"Stream-Optimized Compressed Sparse Extents").
//!
//! Crash-safe ordering: a new grain is written in full and flushed before any grain
//! table entry points at it; the primary and the redundant grain table are then updated
//! (a crash in between leaves a leaked grain or tables that differ in one unflushed
//! entry, never an entry pointing at unwritten space).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{DebugEvent, Error, Limits, MetaRanges, Result, Storage};

use crate::header::{
    CowdHeader, FLAG_COMPRESS, FLAG_MARKER, FLAG_RGD, FLAG_ZERO_GRAIN, GD_AT_END, SECTOR,
    SparseHeader, parse_footer,
};
use crate::layout::{Layout, metadata_ranges, read_table};
use crate::sesparse::SeSparse;

mod stream;

/// qemu's bound on grain directory entries (`vmdk_add_extent`: 32 Mi since qemu 2.11,
/// enough for 8 TB of the smallest grains and tables).
const MAX_L1_ENTRIES: u64 = 32 * 1024 * 1024;
/// qemu's bound on the grain size in sectors (1 GiB).
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// Size of a grain marker before compressed data: `lba` (u64) and `size` (u32).
const MARKER_LEN: u64 = 12;
/// Reads of compressed grains up to this size are sized by the grain alone; larger ones
/// also by what the file holds (one length query).
const BIG_READ: u64 = 1 << 20;

/// What one grain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grain {
    /// Not allocated in this extent.
    Unallocated,
    /// Zeroed grain (GTE 1 with the zeroed-grain flag).
    Zero,
    /// Plain data at this host byte offset.
    Data(u64),
    /// Compressed grain whose marker/stream starts at this host byte offset.
    Compressed(u64),
}

#[derive(Debug)]
struct State {
    gd: Vec<u32>,
    rgd: Vec<u32>,
    cache: HashMap<u64, Vec<u32>>,
    cache_max: usize,
    /// Next free sector at the end of the file (qemu `next_cluster_sector`).
    next_sector: u64,
}

/// One sparse extent file.
#[derive(Debug)]
pub(crate) struct SparseExtent {
    pub(crate) storage: Arc<dyn Storage>,
    /// Extent size in sectors.
    pub(crate) sectors: u64,
    /// Grain size in sectors.
    pub(crate) grain_sectors: u64,
    gtes_per_gt: u64,
    pub(crate) compressed: bool,
    markers: bool,
    zero_grain: bool,
    /// The header, for embedded descriptors and info (None for COWD).
    pub(crate) header: Option<SparseHeader>,
    /// seSparse tables, which replace the classic grain directory.
    se: Option<Box<SeSparse>>,
    /// Header, descriptor, grain directories and tables, stream footer: no data write
    /// may land there.
    meta: MetaRanges,
    state: Mutex<State>,
}

fn corrupt(what: &'static str, at: u64) -> Error {
    Error::corrupt("vmdk", what, at)
}

impl SparseExtent {
    /// Opens a sparse extent file (`KDMV` or `COWD`).
    pub(crate) fn open(storage: Arc<dyn Storage>, writable: bool, limits: &Limits) -> Result<Self> {
        let len = storage.len()?;
        let mut sector0 = [0u8; 512];
        if len < 512 {
            return Err(corrupt("sparse extent shorter than its header", 0));
        }
        storage.read_exact_at(&mut sector0, 0)?;
        if sector0.get(0..4) == Some(crate::header::COWD_MAGIC.as_slice()) {
            let h = CowdHeader::parse(&sector0)?;
            return Self::build(
                storage,
                limits,
                Layout {
                    sectors: u64::from(h.disk_sectors),
                    grain_sectors: u64::from(h.granularity),
                    gtes_per_gt: 4096,
                    l1_size: Some(u64::from(h.l1dir_size)),
                    gd_offset: u64::from(h.l1dir_offset),
                    rgd_offset: None,
                    flags: 0,
                    header: None,
                    // The ESX header is 4 sectors (magic, sizes, parent name), unless the
                    // grain directory claims to start earlier.
                    header_len: u64::from(h.l1dir_offset)
                        .saturating_mul(SECTOR)
                        .clamp(512, 2048),
                    grain_offset: None,
                    footer_at: None,
                    end: len,
                },
            );
        }
        let mut h = SparseHeader::parse(&sector0)?;
        let mut footer_at = None;
        if h.flags & FLAG_COMPRESS != 0 && h.gd_offset == GD_AT_END {
            let at = (len / SECTOR * SECTOR)
                .checked_sub(1536)
                .ok_or_else(|| corrupt("stream-optimized file too short for its footer", 0))?;
            let mut f = [0u8; 1536];
            storage.read_exact_at(&mut f, at)?;
            h = parse_footer(&f, at)?;
            footer_at = Some(at);
        }
        h.validate(writable)?;
        if h.num_gtes_per_gt > 512 {
            return Err(Error::corrupt("vmdk", "L2 table size too big", 44));
        }
        Self::build(
            storage,
            limits,
            Layout {
                sectors: h.capacity,
                grain_sectors: h.granularity,
                gtes_per_gt: u64::from(h.num_gtes_per_gt),
                l1_size: None,
                gd_offset: h.gd_offset,
                rgd_offset: (h.flags & FLAG_RGD != 0).then_some(h.rgd_offset),
                flags: h.flags,
                header_len: SECTOR,
                grain_offset: Some(h.grain_offset),
                footer_at,
                header: Some(h),
                end: len,
            },
        )
    }

    fn build(storage: Arc<dyn Storage>, limits: &Limits, l: Layout) -> Result<Self> {
        let l1_entry_sectors = l.gtes_per_gt.saturating_mul(l.grain_sectors);
        if l1_entry_sectors == 0 {
            return Err(Error::corrupt_unplaced("vmdk", "L1 entry size is invalid"));
        }
        // qemu (`vmdk_open_vmdk4`): everything before the first grain must be in the file,
        // else new grains would be placed over grain tables that lie past its end.
        if let Some(g) = l.grain_offset
            && l.end.div_ceil(SECTOR) < g
        {
            // The header's grain offset (byte 64) lies past the end of the file.
            return Err(Error::corrupt(
                "vmdk",
                format!(
                    "File truncated, expecting at least {} bytes",
                    g.saturating_mul(SECTOR)
                ),
                64,
            ));
        }
        let l1_size = match l.l1_size {
            Some(n) => n,
            None => l.sectors.div_ceil(l1_entry_sectors),
        };
        if l1_size > MAX_L1_ENTRIES {
            return Err(Error::corrupt_unplaced("vmdk", "L1 size too big"));
        }
        if l.grain_sectors > MAX_GRAIN_SECTORS {
            return Err(Error::corrupt_unplaced(
                "vmdk",
                "Invalid granularity, image may be corrupt",
            ));
        }
        // Whole grains are held in memory (compressed grains, copy-on-write).
        limits.check("vmdk grain size", l.grain_sectors * SECTOR)?;
        let gd = read_table(storage.as_ref(), limits, l.gd_offset, l1_size)?;
        let rgd = match l.rgd_offset {
            Some(off) => read_table(storage.as_ref(), limits, off, l1_size)?,
            None => Vec::new(),
        };
        let meta = metadata_ranges(&l, l1_size, &gd, &rgd, limits)?;
        let gt_bytes = l.gtes_per_gt * 4;
        let cache_max = usize::try_from((limits.max_cache_bytes / gt_bytes.max(1)).max(4))
            .unwrap_or(usize::MAX);
        // New grains go after the file's end and after every table (a table past the end
        // of a damaged file must not be overwritten by a grain).
        let next_sector = l.end.div_ceil(SECTOR).max(meta.end().div_ceil(SECTOR));
        Ok(Self {
            storage,
            sectors: l.sectors,
            grain_sectors: l.grain_sectors,
            gtes_per_gt: l.gtes_per_gt,
            compressed: l.flags & FLAG_COMPRESS != 0,
            markers: l.flags & FLAG_MARKER != 0,
            zero_grain: l.flags & FLAG_ZERO_GRAIN != 0,
            header: l.header,
            se: None,
            meta,
            state: Mutex::new(State {
                gd,
                rgd,
                cache: HashMap::new(),
                cache_max,
                next_sector,
            }),
        })
    }

    /// Opens an seSparse extent (read-only, as in qemu).
    pub(crate) fn open_sesparse(
        storage: Arc<dyn Storage>,
        writable: bool,
        limits: &Limits,
    ) -> Result<Self> {
        if writable {
            return Err(Error::unsupported(
                "vmdk",
                "No write support for seSparse images available",
            ));
        }
        let se = SeSparse::open(storage.as_ref(), limits)?;
        Ok(Self {
            sectors: se.capacity,
            grain_sectors: se.grain_sectors(),
            gtes_per_gt: 4096,
            compressed: false,
            markers: false,
            zero_grain: false,
            header: None,
            se: Some(Box::new(se)),
            meta: MetaRanges::new(),
            state: Mutex::new(State {
                gd: Vec::new(),
                rgd: Vec::new(),
                cache: HashMap::new(),
                cache_max: 0,
                next_sector: 0,
            }),
            storage,
        })
    }

    /// Where the extent's metadata lies.
    pub(crate) fn metadata(&self) -> &MetaRanges {
        &self.meta
    }

    /// Grain size in bytes.
    pub(crate) fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn gt_index(&self, grain: u64) -> (u64, u64) {
        (grain / self.gtes_per_gt, grain % self.gtes_per_gt)
    }

    fn load_gt<'a>(&self, st: &'a mut State, l1: u64, gt_sector: u32) -> Result<&'a Vec<u32>> {
        if !st.cache.contains_key(&l1) {
            if st.cache.len() >= st.cache_max {
                st.cache.clear();
            }
            let bytes = self.gtes_per_gt * 4;
            let mut raw = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
            self.storage
                .read_exact_at(&mut raw, u64::from(gt_sector) * SECTOR)
                .map_err(|_| {
                    corrupt(
                        "grain table beyond end of file",
                        u64::from(gt_sector) * SECTOR,
                    )
                })?;
            let gt = raw
                .chunks_exact(4)
                .map(|c| c.le_u32(0).unwrap_or(0))
                .collect();
            st.cache.insert(l1, gt);
        }
        st.cache
            .get(&l1)
            .ok_or_else(|| Error::internal("grain table cache miss"))
    }

    fn lookup_locked(&self, st: &mut State, grain: u64) -> Result<Grain> {
        if let Some(se) = &self.se {
            return se.lookup(self.storage.as_ref(), grain);
        }
        let (l1, l2) = self.gt_index(grain);
        let Some(&gt_sector) = usize::try_from(l1).ok().and_then(|i| st.gd.get(i)) else {
            return Ok(Grain::Unallocated);
        };
        if gt_sector == 0 {
            return Ok(Grain::Unallocated);
        }
        let gt = self.load_gt(st, l1, gt_sector)?;
        let gte = usize::try_from(l2)
            .ok()
            .and_then(|i| gt.get(i))
            .copied()
            .unwrap_or(0);
        Ok(match gte {
            0 => Grain::Unallocated,
            1 if self.zero_grain => Grain::Zero,
            s if self.compressed => Grain::Compressed(u64::from(s) * SECTOR),
            s => Grain::Data(u64::from(s) * SECTOR),
        })
    }

    /// When the whole grain table holding `grain` is unallocated (a zero directory entry, or
    /// past the end of the directory), the first grain of the next table.
    fn next_table_if_unallocated(&self, grain: u64) -> Option<u64> {
        if let Some(se) = &self.se {
            return se.next_table_if_unallocated(grain);
        }
        if self.gtes_per_gt == 0 {
            return None;
        }
        let (l1, _) = self.gt_index(grain);
        let st = self.lock();
        let entry = usize::try_from(l1).ok().and_then(|i| st.gd.get(i)).copied();
        match entry {
            Some(0) => Some(l1.saturating_add(1).saturating_mul(self.gtes_per_gt)),
            Some(_) => None,
            None => Some(u64::MAX),
        }
    }

    /// What grain number `grain` is.
    pub(crate) fn lookup(&self, grain: u64) -> Result<Grain> {
        let mut st = self.lock();
        self.lookup_locked(&mut st, grain)
    }

    /// Inflates the compressed grain at `host` into a full grain buffer.
    pub(crate) fn read_compressed(&self, host: u64) -> Result<Vec<u8>> {
        let mut out = vec![0u8; usize::try_from(self.grain_bytes()).unwrap_or(0)];
        self.read_compressed_into(host, &mut out)?;
        Ok(out)
    }

    /// Inflates the compressed grain at `host` into `out` (one grain).
    ///
    /// A record is read with one call in the usual case: its marker and a stream no
    /// longer than the grain (the rest, if the stream is longer, with a second one). The
    /// file's length is only asked for when the record reaches past its end.
    pub(crate) fn read_compressed_into(&self, host: u64, out: &mut [u8]) -> Result<()> {
        let grain = self.grain_bytes();
        // Without markers the stream's length is unknown: read what qemu reads.
        let mut first = match self.markers {
            true => (grain + MARKER_LEN).div_ceil(SECTOR) * SECTOR,
            false => (grain + MARKER_LEN) * 2,
        };
        if first > BIG_READ {
            // A large grain (the header says up to 1 GiB): no buffer larger than what
            // the file holds from `host`.
            first = first.min(self.storage.len()?.saturating_sub(host));
        }
        let mut raw = vec![0u8; usize::try_from(first).unwrap_or(0)];
        self.read_upto(&mut raw, host)?;
        let data = if self.markers {
            let size = raw
                .le_u32(8)
                .ok_or_else(|| corrupt("compressed grain marker truncated", host))?;
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            // qemu's bound on a record: twice the grain.
            let max = usize::try_from(grain.saturating_mul(2)).unwrap_or(usize::MAX);
            if size == 0 || size > max {
                return Err(corrupt("compressed grain size invalid", host));
            }
            if 12 + size > raw.len() {
                let end = host.saturating_add(12 + size as u64);
                if end > self.storage.len()? {
                    return Err(corrupt("compressed grain size invalid", host));
                }
                let mut rest = vec![0u8; 12 + size - raw.len()];
                self.read_upto(&mut rest, host + raw.len() as u64)?;
                raw.extend_from_slice(&rest);
                if raw.len() < 12 + size {
                    return Err(corrupt("compressed grain size invalid", host));
                }
            }
            raw.get(12..12 + size).unwrap_or(&[])
        } else {
            raw.as_slice()
        };
        let mut d = flate2::Decompress::new(true);
        match d.decompress(data, out, flate2::FlushDecompress::Finish) {
            Ok(flate2::Status::StreamEnd) => {
                // A short stream (qemu's partial last grain) reads as zeroes after it.
                let n = usize::try_from(d.total_out()).unwrap_or(0);
                out.get_mut(n..).unwrap_or_default().fill(0);
                Ok(())
            }
            _ => Err(corrupt(
                "compressed grain does not inflate to one grain",
                host,
            )),
        }
    }

    /// Reads `buf` at `off`, shortened to what the file holds (the vector shrinks).
    fn read_upto(&self, buf: &mut Vec<u8>, off: u64) -> Result<()> {
        if self.storage.read_exact_at(buf, off).is_ok() {
            return Ok(());
        }
        let len = self.storage.len()?;
        let n = usize::try_from(len.saturating_sub(off)).unwrap_or(usize::MAX);
        buf.truncate(n);
        self.storage.read_exact_at(buf, off)
    }

    /// Writes the grain table entry `gte` for `grain` into the primary and redundant
    /// tables (the data it points at must already be durable).
    fn set_gte(&self, st: &mut State, grain: u64, gte: u32) -> Result<()> {
        let (l1, l2) = self.gt_index(grain);
        let i = usize::try_from(l1).map_err(|_| Error::internal("grain index overflow"))?;
        let gt_sector = st.gd.get(i).copied().unwrap_or(0);
        if gt_sector == 0 {
            return Err(Error::unsupported("vmdk", "allocating a grain table"));
        }
        self.load_gt(st, l1, gt_sector)?;
        let bytes = gte.to_le_bytes();
        self.storage
            .write_all_at(&bytes, u64::from(gt_sector) * SECTOR + l2 * 4)?;
        if let Some(&r) = st.rgd.get(i).filter(|&&r| r != 0) {
            self.storage
                .write_all_at(&bytes, u64::from(r) * SECTOR + l2 * 4)?;
        }
        if let Some(slot) = st
            .cache
            .get_mut(&l1)
            .and_then(|gt| gt.get_mut(usize::try_from(l2).unwrap_or(usize::MAX)))
        {
            *slot = gte;
        }
        Ok(())
    }

    fn alloc(&self, st: &mut State, sectors: u64) -> Result<u64> {
        let s = st.next_sector;
        if s.checked_add(sectors)
            .is_none_or(|e| e > u64::from(u32::MAX))
        {
            return Err(Error::invalid(
                "vmdk sparse extent full (grain offsets are 32-bit)",
            ));
        }
        st.next_sector = s + sectors;
        Ok(s)
    }

    /// Writes `data` at byte `in_grain` of `grain`. `fill` provides the grain's current
    /// content when it must be allocated (backing data, or zeroes).
    pub(crate) fn write(
        &self,
        grain: u64,
        in_grain: usize,
        data: &[u8],
        fill: &dyn Fn(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let mut st = self.lock();
        let g = self.lookup_locked(&mut st, grain)?;
        let gb = usize::try_from(self.grain_bytes()).map_err(|_| Error::internal("grain size"))?;
        match g {
            Grain::Data(host) => {
                drop(st);
                let at = host.saturating_add(in_grain as u64);
                self.meta.guard_write("vmdk", at, data.len() as u64)?;
                self.storage.debug_event(DebugEvent::WriteAio);
                self.storage.write_all_at(data, at)
            }
            Grain::Compressed(_) => Err(Error::invalid(
                "Could not write to allocated cluster for streamOptimized",
            )),
            Grain::Zero | Grain::Unallocated => {
                let mut buf = vec![0u8; gb];
                if g == Grain::Unallocated {
                    fill(&mut buf)?;
                }
                buf.get_mut(in_grain..in_grain + data.len())
                    .ok_or_else(|| Error::internal("write crosses a grain"))?
                    .copy_from_slice(data);
                if self.compressed {
                    return self.append_compressed(&mut st, grain, &buf);
                }
                let sector = self.alloc(&mut st, self.grain_sectors)?;
                self.meta
                    .guard_write("vmdk", sector * SECTOR, buf.len() as u64)?;
                // qemu's vmdk_write_extent raises write_aio before writing guest data.
                self.storage.debug_event(DebugEvent::WriteAio);
                self.storage.write_all_at(&buf, sector * SECTOR)?;
                self.storage.flush()?;
                self.set_gte(&mut st, grain, u32::try_from(sector).unwrap_or(0))
            }
        }
    }

    /// Deflates a whole grain into its on-disk record: marker (`lba`, `size`), zlib
    /// stream, padding to a sector.
    fn compress_record(&self, grain: u64, buf: &[u8]) -> Result<Vec<u8>> {
        crate::streaming::deflate_record(grain.saturating_mul(self.grain_sectors), buf)
    }

    /// Appends a compressed record for `grain` and points the grain tables at it.
    fn append_record(&self, st: &mut State, grain: u64, rec: &[u8]) -> Result<()> {
        let sector = self.alloc(st, rec.len() as u64 / SECTOR)?;
        self.meta
            .guard_write("vmdk", sector * SECTOR, rec.len() as u64)?;
        self.storage.write_all_at(rec, sector * SECTOR)?;
        self.storage.flush()?;
        self.set_gte(st, grain, u32::try_from(sector).unwrap_or(0))
    }

    /// Compresses a whole grain and appends it with its marker (stream-optimized).
    fn append_compressed(&self, st: &mut State, grain: u64, buf: &[u8]) -> Result<()> {
        let rec = self.compress_record(grain, buf)?;
        self.append_record(st, grain, &rec)
    }

    /// Makes a whole grain read as zeroes: a zeroed-grain entry when the extent has them.
    /// Returns false when the caller must write zero bytes instead.
    pub(crate) fn zero_grain(&self, grain: u64) -> Result<bool> {
        if !self.zero_grain {
            return Ok(false);
        }
        let mut st = self.lock();
        if self.lookup_locked(&mut st, grain)? == Grain::Zero {
            return Ok(true);
        }
        self.set_gte(&mut st, grain, 1)?;
        Ok(true)
    }

    /// qemu's check: every allocated grain must lie inside the file.
    pub(crate) fn check(
        &self,
        base_sector: u64,
        report: &mut diskimg_blockio::CheckReport,
    ) -> Result<()> {
        let len = self.storage.len()?;
        let grains = self.sectors.div_ceil(self.grain_sectors);
        let mut g = 0;
        while g < grains {
            // Whole unallocated grain tables are skipped: a hostile header can claim a capacity
            // of 2^32 grains and more, and one lookup per grain made check() hang.
            if let Some(next) = self.next_table_if_unallocated(g) {
                g = next;
                continue;
            }
            let lookup = self.lookup(g);
            g += 1;
            match lookup {
                Ok(Grain::Data(h) | Grain::Compressed(h)) if h >= len => {
                    report.corruptions += 1;
                    report.messages.push(format!(
                        "ERROR: cluster offset for sector {} points after EOF",
                        base_sector + (g - 1) * self.grain_sectors
                    ));
                    break;
                }
                Ok(_) => {}
                Err(_) => {
                    report.check_errors += 1;
                    report.messages.push(format!(
                        "ERROR: could not get cluster_offset for sector {}",
                        base_sector + (g - 1) * self.grain_sectors
                    ));
                    break;
                }
            }
        }
        Ok(())
    }
}
