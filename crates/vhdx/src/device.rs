//! The open image: parsing at open (with log replay), reads and map.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{
    BackingRef, BlockDevice, Error, Extent, ExtentKind, HostRun, Layout, Mapping, MetaRanges,
    OpenOptions, PastEof, Result, Storage, map_via, read_via,
};

use crate::bat::{
    Geometry, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT,
    PAYLOAD_UNDEFINED, PAYLOAD_UNMAPPED, PAYLOAD_ZERO, SB_PRESENT, entry_offset, entry_state,
};
use crate::format::{FMT, LOG_SECTOR, MIB};
use crate::header::{Header, Regions, read_current_header, read_regions};
use crate::layout::{check_bat, metadata_map};
use crate::log::{apply, find_replay};
use crate::metadata::{Metadata, read_metadata};
use crate::overlay::ReplayedStorage;

/// What happened to a dirty log at open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogReplay {
    /// The log was empty.
    None,
    /// Replayed and written back to the file (read-write open).
    OnDisk,
    /// Replayed in memory only (read-only open): the file still needs a replay.
    InMemory,
}

/// Mutable state under the device lock.
#[derive(Debug)]
pub(crate) struct State {
    /// The current header.
    pub(crate) header: Header,
    /// Its slot (0 or 1).
    pub(crate) slot: usize,
    /// The BAT's bytes, rounded up to whole 4 KiB log sectors.
    pub(crate) bat: Vec<u8>,
    /// Where the next block is allocated (1 MiB aligned end of file).
    pub(crate) file_end: u64,
    /// Header section, log, regions and sector bitmap blocks: no data write may land
    /// there.
    pub(crate) meta: MetaRanges,
    /// The write GUIDs were renewed for this session.
    pub(crate) session_started: bool,
    /// Sequence number of the next log entry.
    pub(crate) log_sequence: u64,
    /// Log offset where the next entry goes.
    pub(crate) log_head: u64,
    /// The header names a log GUID we chose in this session (entries may follow).
    pub(crate) log_active: bool,
}

impl State {
    /// BAT entry `i` (zero beyond the table).
    pub(crate) fn entry(&self, i: u64) -> u64 {
        usize::try_from(i)
            .ok()
            .and_then(|i| i.checked_mul(8))
            .and_then(|o| self.bat.le_u64(o))
            .unwrap_or(0)
    }
}

/// An open VHDX image (dynamic, fixed or differencing).
#[derive(Debug)]
pub struct VhdxDevice {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) read_only: bool,
    pub(crate) closed: diskimg_blockio::Closed,
    pub(crate) meta: Metadata,
    /// Current virtual size (changes with resize; `meta.virtual_size` is the size at open).
    pub(crate) size: AtomicU64,
    /// Geometry; `data_blocks`/`entries` are those at open (see [`Geometry::for_size`]).
    pub(crate) geo: Geometry,
    pub(crate) regions: Regions,
    pub(crate) replay: LogReplay,
    pub(crate) state: RwLock<State>,
    pub(crate) backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    /// The backing device's part of the host epoch (`BlockDevice::host_epoch`).
    pub(crate) backing_epoch: diskimg_blockio::BackingEpoch,
    /// Verify a VHDX parent's `DataWriteGuid` against `parent_linkage` (see `linkage`).
    pub(crate) check_linkage: bool,
}

impl VhdxDevice {
    /// Opens `storage` as VHDX. A dirty log is replayed: to the file when writable,
    /// in memory when read-only (the file is left untouched).
    pub fn open(storage: Arc<dyn Storage>, options: &OpenOptions) -> Result<Self> {
        let read_only = options.read_only || storage.is_read_only();
        let check_linkage = crate::linkage::check_enabled(options)?;
        if !crate::header::has_signature(storage.as_ref()) {
            return Err(Error::not_format(FMT, "missing vhdxfile signature", 0));
        }
        let (header, slot) = read_current_header(storage.as_ref())?;
        // The region table (which replay may not change) is checked before the log is
        // replayed into the file: an image with overlapping regions is left untouched.
        let log = (header.log_offset, u64::from(header.log_length));
        let regions = read_regions(storage.as_ref(), log)?;
        let file_len = storage.len()?;
        let mut replay = LogReplay::None;
        let mut storage = storage;
        if let Some(r) = find_replay(storage.as_ref(), &header, file_len, &options.limits)? {
            if read_only {
                storage = Arc::new(ReplayedStorage::new(storage, r));
                replay = LogReplay::InMemory;
            } else {
                apply(storage.as_ref(), &r)?;
                storage.flush()?;
                replay = LogReplay::OnDisk;
            }
        }
        // Tables are checked against the file as it was before the replay: a log entry's
        // LastFileOffset may grow it (with zeroes) to any size, and regions are laid out
        // at create time, inside the file.
        let meta = read_metadata(
            storage.as_ref(),
            &regions.metadata,
            file_len,
            &options.limits,
        )?;
        let geo = Geometry::new(&meta)?;
        let bat_bytes = geo.entries.checked_mul(8).ok_or(Error::corrupt(
            FMT,
            "BAT too large",
            regions.bat.offset,
        ))?;
        if bat_bytes > u64::from(regions.bat.length) {
            return Err(Error::corrupt(
                FMT,
                "BAT region too small for the virtual disk size",
                regions.bat.offset,
            ));
        }
        let bat_len = bat_bytes
            .next_multiple_of(LOG_SECTOR)
            .min(u64::from(regions.bat.length));
        // The BAT must lie in the file; checked before it is allocated, so a header's
        // claim costs memory proportional to the file.
        let mut bat =
            options
                .limits
                .alloc_in_file(FMT, "VHDX BAT", regions.bat.offset, bat_len, file_len)?;
        storage.read_exact_at(&mut bat, regions.bat.offset)?;
        let check = options.driver_options.get("check") == Some("on");
        let meta_map = metadata_map(&header, &regions, &bat, &geo, check)?;
        let file_len = storage.len()?;
        if !check {
            check_bat(
                &bat,
                regions.bat.offset,
                &geo,
                meta.virtual_size,
                file_len,
                &meta_map,
            )?;
        }
        // New blocks go after the end of the file and after all metadata (a log or
        // region past the end of a damaged file must not receive a block).
        let file_end = file_len.max(meta_map.end()).next_multiple_of(MIB);
        let dev = Self {
            storage,
            read_only,
            closed: diskimg_blockio::Closed::new(),
            size: AtomicU64::new(meta.virtual_size),
            meta,
            geo,
            regions,
            replay,
            state: RwLock::new(State {
                header,
                slot,
                bat,
                file_end,
                meta: meta_map,
                session_started: false,
                log_sequence: 1,
                log_head: 0,
                log_active: false,
            }),
            backing: RwLock::new(None),
            backing_epoch: diskimg_blockio::BackingEpoch::default(),
            check_linkage,
        };
        if replay == LogReplay::OnDisk {
            // The log is applied and durable: mark it empty.
            let mut st = dev.write_state();
            dev.update_header(&mut st, |h| h.log_guid = crate::format::Guid::ZERO)?;
        }
        Ok(dev)
    }

    /// `"dynamic"`, `"fixed"` or `"differencing"`.
    pub fn subformat(&self) -> &'static str {
        if self.meta.has_parent {
            "differencing"
        } else if self.meta.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }

    /// Logical and physical sector sizes (MS-VHDX 2.6.2.4, 2.6.2.5).
    pub fn sector_sizes(&self) -> (u32, u32) {
        (self.meta.logical_sector, self.meta.physical_sector)
    }

    /// True when the image had a dirty log that was replayed only in memory (a
    /// read-only open): the file still needs `check -r all` or a read-write open.
    pub fn needs_log_replay(&self) -> bool {
        self.replay == LogReplay::InMemory
    }

    /// The current virtual size.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn backing_dev(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The parent named by the parent locator, as the facade should try it.
    pub(crate) fn backing_ref(&self) -> Option<BackingRef> {
        let p = self.meta.parent.as_ref()?;
        let norm = |s: &str| s.replace('\\', "/");
        let mut names: Vec<String> = ["relative_path", "volume_path", "absolute_win32_path"]
            .iter()
            .filter_map(|k| p.get(k))
            .map(norm)
            .collect();
        if names.is_empty() {
            return None;
        }
        let first = names.remove(0);
        let first = first
            .strip_prefix("./")
            .map(str::to_string)
            .unwrap_or(first);
        let mut r = BackingRef::new(first, Some("vhdx".to_string()));
        r.alternates = names;
        Some(r)
    }

    /// Reads the sector bitmap bits for sectors `first..first+count` of the chunk of
    /// `block` (one bool per sector).
    pub(crate) fn bitmap_bits(
        &self,
        st: &State,
        block: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<bool>> {
        let sb = st.entry(self.geo.bitmap_index(block));
        if entry_state(sb) != SB_PRESENT || entry_offset(sb) == 0 {
            return Err(Error::corrupt(
                FMT,
                "partially present block without a sector bitmap",
                self.regions.bat.offset,
            ));
        }
        let base = self.geo.bitmap_first_sector(block) + first;
        let byte0 = base / 8;
        let byte1 = (base + count).div_ceil(8);
        let mut bytes = vec![0u8; usize::try_from(byte1 - byte0).unwrap_or(0)];
        self.storage
            .read_exact_at(&mut bytes, entry_offset(sb) + byte0)?;
        Ok((0..count)
            .map(|i| {
                let s = base + i - byte0 * 8;
                let b = bytes
                    .get(usize::try_from(s / 8).unwrap_or(usize::MAX))
                    .copied()
                    .unwrap_or(0);
                b >> (s % 8) & 1 == 1
            })
            .collect())
    }

    /// What `len` bytes at `offset` within one block are: the extent kind and its length.
    fn classify(&self, st: &State, offset: u64, len: u64) -> Result<(ExtentKind, u64)> {
        let bs = self.geo.block_size;
        let block = offset / bs;
        let in_off = offset % bs;
        let len = len.min(bs - in_off);
        let e = st.entry(self.geo.payload_index(block));
        let off = entry_offset(e);
        let kind = match entry_state(e) {
            PAYLOAD_NOT_PRESENT => ExtentKind::Unallocated { offset: None },
            PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {
                ExtentKind::Zero { offset: None }
            }
            PAYLOAD_FULLY_PRESENT if off != 0 => ExtentKind::Data {
                offset: Some(off + in_off),
            },
            PAYLOAD_PARTIALLY_PRESENT if off != 0 && self.meta.has_parent => {
                let ls = self.geo.logical_sector;
                let first = in_off / ls;
                let last = (in_off + len - 1) / ls;
                let bits = self.bitmap_bits(st, block, first, last - first + 1)?;
                let set = bits.first().copied().unwrap_or(false);
                let run = bits.iter().take_while(|&&b| b == set).count() as u64;
                let run_end = ((first + run) * ls).min(in_off + len);
                let kind = if set {
                    ExtentKind::Data {
                        offset: Some(off + in_off),
                    }
                } else {
                    ExtentKind::Unallocated { offset: None }
                };
                return Ok((kind, run_end - in_off));
            }
            _ => {
                return Err(Error::corrupt(
                    FMT,
                    "invalid BAT entry",
                    self.regions.bat.offset,
                ));
            }
        };
        Ok((kind, len))
    }

    /// Reads guest bytes with the state lock held.
    pub(crate) fn read_locked(&self, st: &State, buf: &mut [u8], offset: u64) -> Result<()> {
        read_via(&View { dev: self, st }, buf, offset)
    }

    /// The layout walk ([`BlockDevice::walk_runs`]) with the state lock held.
    pub(crate) fn walk_locked(
        &self,
        st: &State,
        offset: u64,
        len: u64,
        f: &mut diskimg_blockio::RunFn<'_>,
    ) -> Result<bool> {
        diskimg_blockio::walk(&View { dev: self, st }, offset, len, f)
    }

    /// `map` with the state lock held.
    pub(crate) fn map_locked(&self, st: &State, offset: u64, len: u64) -> Result<Extent> {
        map_via(&View { dev: self, st }, offset, len)
    }
}

/// The BAT under the state lock, for [`read_via`] and [`map_via`].
struct View<'a> {
    dev: &'a VhdxDevice,
    st: &'a State,
}

impl Layout for View<'_> {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    /// Present data is a host run (a BAT entry past the end of the file is corrupt);
    /// absent blocks and sectors read from the parent (or as zeroes without one).
    fn lookup(&self, offset: u64, max: u64) -> Result<(Mapping<'_>, u64)> {
        let (kind, n) = self.dev.classify(self.st, offset, max)?;
        let n = n.max(1).min(max);
        let m = match kind {
            ExtentKind::Data { offset: Some(h) } => {
                let past_eof = PastEof::Corrupt {
                    format: FMT,
                    what: "BAT entry points after end of file",
                    offset: self.dev.regions.bat.offset,
                };
                Mapping::Host(HostRun::new(self.dev.storage.as_ref(), h).past_eof(past_eof))
            }
            ExtentKind::Unallocated { .. } => Mapping::Unallocated { host: None },
            ExtentKind::Zero { offset } => Mapping::Zero { host: offset },
            kind => Mapping::Special { kind, token: 0 },
        };
        Ok((m, n))
    }

    /// Only for kinds `classify` never returns: zeroes, as before.
    fn read_special(&self, _token: u64, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        if self.dev.meta.has_parent {
            self.dev.backing_dev()
        } else {
            None
        }
    }
}
