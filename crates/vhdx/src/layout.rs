//! Where an image's metadata lies (MS-VHDX 2.1: header section, log, regions, sector
//! bitmap blocks) and the BAT checks made at open: qemu's `vhdx_check_bat_entries`
//! (blocks past the end of the file, blocks over the log or a region), plus sector bitmap
//! blocks over metadata. A `check` open skips the BAT checks (qemu's `BDRV_O_CHECK`):
//! `check` reports those entries instead.

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{Error, MetaRanges, Result};

use crate::bat::{
    Geometry, PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT, SB_BLOCK_SIZE, SB_PRESENT,
    entry_offset, entry_state,
};
use crate::format::{FMT, MIB};
use crate::header::{Header, Regions};

/// Name of the sector bitmap block ranges (write paths check bitmap updates by it).
pub(crate) const SECTOR_BITMAP: &str = "sector bitmap block";

/// The BAT entry `i` of the raw table `bat` (zero beyond it).
fn entry(bat: &[u8], i: u64) -> u64 {
    usize::try_from(i)
        .ok()
        .and_then(|i| i.checked_mul(8))
        .and_then(|o| bat.le_u64(o))
        .unwrap_or(0)
}

/// The metadata of an image: header section, log, BAT and metadata regions, and every
/// present sector bitmap block. With `check` set, bitmap blocks that overlap metadata
/// are left out (for `check` to report); otherwise they are refused.
pub(crate) fn metadata_map(
    header: &Header,
    regions: &Regions,
    bat: &[u8],
    geo: &Geometry,
    check: bool,
) -> Result<MetaRanges> {
    // The region table check (`read_regions`) already refused overlaps among these.
    let mut meta = MetaRanges::build([
        (0, MIB, "header section"),
        (header.log_offset, u64::from(header.log_length), "log"),
        (
            regions.bat.offset,
            u64::from(regions.bat.length),
            "BAT region",
        ),
        (
            regions.metadata.offset,
            u64::from(regions.metadata.length),
            "metadata region",
        ),
    ])
    .map_err(|o| o.to_error(FMT))?;
    let chunks = geo.data_blocks.div_ceil(geo.chunk_ratio);
    for chunk in 0..chunks {
        let i = geo.bitmap_index(chunk * geo.chunk_ratio);
        let e = entry(bat, i);
        let off = entry_offset(e);
        if entry_state(e) != SB_PRESENT || off == 0 {
            continue;
        }
        match meta.insert(off, SB_BLOCK_SIZE, SECTOR_BITMAP) {
            Ok(()) => {}
            Err(_) if check => {}
            Err(_) => {
                return Err(Error::corrupt(
                    FMT,
                    "sector bitmap block overlaps metadata",
                    off,
                ));
            }
        }
    }
    Ok(meta)
}

/// qemu's `vhdx_check_bat_entries` for a normal open: every present payload block must
/// lie inside the file (the last one may be short) and off the metadata. `bat_at` is
/// the BAT region's file offset (for the error's offset).
pub(crate) fn check_bat(
    bat: &[u8],
    bat_at: u64,
    geo: &Geometry,
    size: u64,
    file_len: u64,
    meta: &MetaRanges,
) -> Result<()> {
    for block in 0..geo.data_blocks {
        let index = geo.payload_index(block);
        let e = entry(bat, index);
        let off = entry_offset(e);
        let entry_at = index.saturating_mul(8).saturating_add(bat_at);
        if !matches!(
            entry_state(e),
            PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT
        ) || off == 0
        {
            continue;
        }
        let len = geo
            .block_size
            .min(size.saturating_sub(block.saturating_mul(geo.block_size)));
        if off >= file_len {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "VHDX BAT entry {block} start offset {off} points after end of file \
                     ({file_len}). Image has probably been truncated."
                ),
                entry_at,
            ));
        }
        if off.saturating_add(len) > file_len {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "VHDX BAT entry {block} end offset {} points after end of file \
                     ({file_len}). Image has probably been truncated.",
                    off.saturating_add(len) - 1
                ),
                entry_at,
            ));
        }
        if meta.overlapping(off, geo.block_size).is_some() {
            return Err(Error::corrupt(
                FMT,
                "BAT entry points at image metadata",
                off,
            ));
        }
    }
    Ok(())
}
