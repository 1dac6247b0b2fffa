//! The layout of a sparse extent as its header describes it: where the grain directories
//! and tables lie, read and checked at open ([`metadata_ranges`] refuses overlapping
//! structures; VMware "Virtual Disk Format 5.0" §"Hosted Sparse Extent Header").

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{Error, Limits, MetaRanges, Result, Storage};

use crate::header::{SECTOR, SparseHeader};

/// Reads `n` little-endian u32 entries at `sector` (a grain directory).
///
/// Only the part of the directory inside the file is read and held: qemu reads bytes
/// past the end of the file as zeroes, so entries there are unallocated tables, which
/// is what a missing entry means to the lookups. A header claiming a huge directory
/// thus costs memory proportional to the file, never to the claim.
pub(crate) fn read_table(
    storage: &dyn Storage,
    limits: &Limits,
    sector: u64,
    n: u64,
) -> Result<Vec<u32>> {
    let bytes = n
        .checked_mul(4)
        .ok_or_else(|| Error::corrupt_unplaced("vmdk", "grain table size overflows"))?;
    let off = sector
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::corrupt_unplaced("vmdk", "table offset overflows"))?;
    let in_file = storage.len()?.saturating_sub(off).min(bytes) / 4 * 4;
    let mut raw = limits.alloc("vmdk grain directory", in_file)?;
    storage.read_exact_at(&mut raw, off)?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| c.le_u32(0).unwrap_or(0))
        .collect())
}

/// What the header says about a sparse extent.
pub(crate) struct Layout {
    /// Extent size in sectors (`capacity`, COWD `numSectors`).
    pub(crate) sectors: u64,
    /// Grain size in sectors (`grainSize`).
    pub(crate) grain_sectors: u64,
    /// Entries per grain table (`numGTEsPerGT`; 4096 in COWD).
    pub(crate) gtes_per_gt: u64,
    /// Grain directory entries when the header gives them (COWD `numGDEntries`).
    pub(crate) l1_size: Option<u64>,
    /// `gdOffset` in sectors.
    pub(crate) gd_offset: u64,
    /// `rgdOffset` in sectors, when the redundant directory flag is set.
    pub(crate) rgd_offset: Option<u64>,
    /// Header `flags`.
    pub(crate) flags: u32,
    /// The hosted sparse header (None for COWD).
    pub(crate) header: Option<SparseHeader>,
    /// Bytes of the header at offset 0.
    pub(crate) header_len: u64,
    /// `overHead` (sectors before the first grain) of a hosted sparse header.
    pub(crate) grain_offset: Option<u64>,
    /// Host offset of the footer of a stream-optimized file whose directory is at the end.
    pub(crate) footer_at: Option<u64>,
    /// File length.
    pub(crate) end: u64,
}

/// Where the metadata of the extent described by `l` lies; fails when two structures
/// overlap (a grain table over the directory or the header, two tables sharing bytes).
pub(crate) fn metadata_ranges(
    l: &Layout,
    l1_size: u64,
    gd: &[u32],
    rgd: &[u32],
    limits: &Limits,
) -> Result<MetaRanges> {
    let tables = gd.iter().chain(rgd).filter(|&&s| s != 0).count() as u64;
    limits.check(
        "vmdk metadata map",
        tables.saturating_add(5).saturating_mul(32),
    )?;
    let at = |sector: u64| sector.saturating_mul(SECTOR);
    let gd_bytes = l1_size.saturating_mul(4);
    let gt_bytes = l.gtes_per_gt.saturating_mul(4);
    let mut v = vec![(0, l.header_len, "sparse header")];
    if let Some(h) = &l.header
        && h.desc_offset > 0
    {
        v.push((at(h.desc_offset), at(h.desc_size), "embedded descriptor"));
    }
    v.push((at(l.gd_offset), gd_bytes, "grain directory"));
    if let Some(r) = l.rgd_offset {
        v.push((at(r), gd_bytes, "redundant grain directory"));
    }
    let gts = |t: &[u32], name| {
        t.iter()
            .filter(|&&s| s != 0)
            .map(move |&s| (at(u64::from(s)), gt_bytes, name))
            .collect::<Vec<_>>()
    };
    v.extend(gts(gd, "grain table"));
    v.extend(gts(rgd, "redundant grain table"));
    if let Some(f) = l.footer_at {
        v.push((f, 1536, "stream-optimized footer"));
    }
    MetaRanges::build(v).map_err(|o| o.to_error("vmdk"))
}
