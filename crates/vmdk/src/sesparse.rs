//! ESXi space-efficient sparse extents (`SESPARSE`), read-only as in qemu. The format is
//! not publicly documented; the layout and the strict checks follow qemu's `block/vmdk.c`:
//! a 512-byte constant header (magic `0xcafebabe`, version `0x200000001`, 4 KiB grains,
//! 4096-entry grain tables), a volatile header (magic `0xcafecafe`, no journal to
//! replay), a grain directory of 64-bit entries (`0x1000_0000_xxxx_xxxx` = table number),
//! and grain table entries whose top nibble is the grain state (0 unallocated, 1 unmapped,
//! 2 zero, 3 allocated with a 60-bit scrambled grain number).

use std::collections::HashMap;
use std::sync::Mutex;

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{Error, Limits, Result, Storage};

use crate::header::SECTOR;
use crate::sparse::Grain;

const CONST_MAGIC: u64 = 0xcafe_babe;
const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
const VERSION: u64 = 0x0000_0002_0000_0001;
/// Entries per grain table (64 sectors of u64).
const GT_ENTRIES: u64 = 4096;

fn bad(what: &'static str, at: u64) -> Error {
    Error::corrupt("vmdk", what, at)
}

/// The parsed tables of one seSparse extent.
#[derive(Debug)]
pub(crate) struct SeSparse {
    /// Capacity in sectors.
    pub(crate) capacity: u64,
    /// The directory entries inside the file (the rest read as zero).
    gd: Vec<u64>,
    /// Directory entries the header claims (`grain_dir_size`).
    gd_entries: u64,
    gt_offset: u64,
    grains_offset: u64,
    cache: Mutex<HashMap<u64, Vec<u64>>>,
    cache_max: usize,
}

impl SeSparse {
    /// Parses the headers and the grain directory.
    pub(crate) fn open(storage: &dyn Storage, limits: &Limits) -> Result<Self> {
        let mut h = [0u8; 512];
        storage.read_exact_at(&mut h, 0)?;
        let f = |o: usize| h.le_u64(o).unwrap_or(u64::MAX);
        if f(0) != CONST_MAGIC {
            return Err(bad("bad seSparse const header magic", 0));
        }
        if f(8) != VERSION {
            return Err(Error::unsupported(
                "vmdk",
                format!("Unsupported version: 0x{:016x}", f(8)),
            ));
        }
        if f(24) != 8 {
            return Err(Error::unsupported(
                "vmdk",
                format!("Unsupported grain size: {}", f(24)),
            ));
        }
        if f(32) != 64 {
            return Err(Error::unsupported(
                "vmdk",
                format!("Unsupported grain table size: {}", f(32)),
            ));
        }
        if f(40) != 0 {
            return Err(Error::unsupported(
                "vmdk",
                format!("Unsupported flags: 0x{:016x}", f(40)),
            ));
        }
        if (48..80).step_by(8).any(|o| f(o) != 0) {
            return Err(Error::unsupported("vmdk", "Unsupported reserved bits"));
        }
        if h.get(208..).is_some_and(|p| p.iter().any(|&b| b != 0)) {
            return Err(Error::unsupported(
                "vmdk",
                "Unsupported non-zero const header padding",
            ));
        }
        let vol_at = f(80)
            .checked_mul(SECTOR)
            .ok_or_else(|| bad("volatile header offset overflows", 80))?;
        let mut v = [0u8; 512];
        storage.read_exact_at(&mut v, vol_at)?;
        if v.le_u64(0) != Some(VOLATILE_MAGIC) {
            return Err(bad("bad seSparse volatile header magic", vol_at));
        }
        if v.le_u64(24) != Some(0) {
            return Err(Error::unsupported(
                "vmdk",
                "Image is dirty, Replaying journal not supported",
            ));
        }
        if v.get(32..).is_some_and(|p| p.iter().any(|&b| b != 0)) {
            return Err(Error::unsupported(
                "vmdk",
                "Unsupported non-zero volatile header padding",
            ));
        }
        let l1_size = f(136).saturating_mul(SECTOR) / 8;
        if l1_size > 32 * 1024 * 1024 {
            return Err(Error::corrupt("vmdk", "L1 size too big", 136));
        }
        let gd_at = f(128)
            .checked_mul(SECTOR)
            .ok_or_else(|| bad("grain directory offset overflows", 128))?;
        // Only the part inside the file is read and held (qemu reads past the end as
        // zeroes: unallocated tables), so memory is proportional to the file.
        let in_file = storage.len()?.saturating_sub(gd_at).min(l1_size * 8) / 8 * 8;
        let mut raw = limits.alloc("vmdk seSparse grain directory", in_file)?;
        storage.read_exact_at(&mut raw, gd_at)?;
        let gd = raw
            .chunks_exact(8)
            .map(|c| c.le_u64(0).unwrap_or(0))
            .collect();
        let cache_max =
            usize::try_from((limits.max_cache_bytes / (GT_ENTRIES * 8)).max(4)).unwrap_or(4);
        Ok(Self {
            capacity: f(16),
            gd,
            gd_entries: l1_size,
            gt_offset: f(144),
            grains_offset: f(192),
            cache: Mutex::new(HashMap::new()),
            cache_max,
        })
    }

    /// Grain size in sectors (always 8).
    pub(crate) fn grain_sectors(&self) -> u64 {
        8
    }

    /// The directory entry for table `l1`: zero past the end of the file, None past the
    /// end of the directory.
    fn gde(&self, l1: u64) -> Option<u64> {
        if l1 >= self.gd_entries {
            return None;
        }
        Some(
            usize::try_from(l1)
                .ok()
                .and_then(|i| self.gd.get(i))
                .copied()
                .unwrap_or(0),
        )
    }

    /// When the grain table holding `grain` has a zero directory entry, the first grain of
    /// the next table (past the part of the directory in the file: its end).
    pub(crate) fn next_table_if_unallocated(&self, grain: u64) -> Option<u64> {
        let l1 = grain / GT_ENTRIES;
        if l1 >= self.gd.len() as u64 && l1 < self.gd_entries {
            return Some(self.gd_entries.saturating_mul(GT_ENTRIES));
        }
        (self.gde(l1)? == 0).then(|| l1.saturating_add(1).saturating_mul(GT_ENTRIES))
    }

    /// What grain number `grain` is.
    pub(crate) fn lookup(&self, storage: &dyn Storage, grain: u64) -> Result<Grain> {
        let l1 = grain / GT_ENTRIES;
        let l2 = grain % GT_ENTRIES;
        let gde = self
            .gde(l1)
            .ok_or_else(|| bad("grain beyond the seSparse grain directory", 0))?;
        if gde == 0 {
            return Ok(Grain::Unallocated);
        }
        if gde & 0xffff_ffff_0000_0000 != 0x1000_0000_0000_0000 {
            return Err(bad("invalid seSparse grain directory entry", 0));
        }
        let gt_sector = (gde & 0xffff_ffff)
            .checked_mul(GT_ENTRIES * 8 / SECTOR)
            .and_then(|s| s.checked_add(self.gt_offset))
            .filter(|&s| s <= u64::from(u32::MAX))
            .ok_or_else(|| bad("seSparse grain table offset out of range", 0))?;
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !cache.contains_key(&l1) {
            if cache.len() >= self.cache_max {
                cache.clear();
            }
            let mut raw = vec![0u8; usize::try_from(GT_ENTRIES * 8).unwrap_or(0)];
            storage
                .read_exact_at(&mut raw, gt_sector * SECTOR)
                .map_err(|_| {
                    bad(
                        "seSparse grain table beyond end of file",
                        gt_sector * SECTOR,
                    )
                })?;
            cache.insert(
                l1,
                raw.chunks_exact(8)
                    .map(|c| c.le_u64(0).unwrap_or(0))
                    .collect(),
            );
        }
        let gte = cache
            .get(&l1)
            .and_then(|gt| gt.get(usize::try_from(l2).unwrap_or(usize::MAX)))
            .copied()
            .unwrap_or(0);
        match gte >> 60 {
            0 if gte == 0 => Ok(Grain::Unallocated),
            1 | 2 => Ok(Grain::Zero),
            3 => {
                let n =
                    ((gte & 0x0fff_0000_0000_0000) >> 48) | ((gte & 0x0000_ffff_ffff_ffff) << 12);
                let sector = n
                    .checked_mul(self.grain_sectors())
                    .and_then(|s| s.checked_add(self.grains_offset))
                    .and_then(|s| s.checked_mul(SECTOR))
                    .ok_or_else(|| bad("seSparse grain offset overflows", 0))?;
                Ok(Grain::Data(sector))
            }
            _ => Err(bad("invalid seSparse grain table entry", 0)),
        }
    }
}
