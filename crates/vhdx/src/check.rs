//! `check`: BAT entries against the file size and against each other (as qemu's
//! `vhdx_co_check`), plus the log state (reported by the caller).

use diskimg_blockio::{CheckReport, Result};

use crate::bat::{
    PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_UNDEFINED,
    PAYLOAD_UNMAPPED, PAYLOAD_ZERO, SB_BLOCK_SIZE, SB_NOT_PRESENT, SB_PRESENT, entry_offset,
    entry_state,
};
use crate::device::{State, VhdxDevice};
use crate::header::FIXED_AREA;

/// Checks the BAT of `dev`.
pub(crate) fn check(dev: &VhdxDevice, st: &State) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let file_len = dev.storage.len()?;
    let geo = &dev.geo.for_size(dev.size(), dev.meta.has_parent);
    // Host ranges in use: fixed area, log, BAT, metadata, then every block.
    let mut used: Vec<(u64, u64, Option<u64>)> = vec![
        (0, FIXED_AREA, None),
        (st.header.log_offset, u64::from(st.header.log_length), None),
        (
            dev.regions.bat.offset,
            u64::from(dev.regions.bat.length),
            None,
        ),
        (
            dev.regions.metadata.offset,
            u64::from(dev.regions.metadata.length),
            None,
        ),
    ];
    // Payload blocks, as qemu's vhdx_check_bat_entries (messages use the block number).
    for block in 0..geo.data_blocks {
        let e = st.entry(geo.payload_index(block));
        let state = entry_state(e);
        let off = entry_offset(e);
        let valid = matches!(
            state,
            PAYLOAD_NOT_PRESENT
                | PAYLOAD_UNDEFINED
                | PAYLOAD_ZERO
                | PAYLOAD_UNMAPPED
                | PAYLOAD_FULLY_PRESENT
        ) || (state == PAYLOAD_PARTIALLY_PRESENT && dev.meta.has_parent);
        if !valid {
            r.corruptions += 1;
            r.messages.push(format!(
                "VHDX BAT entry {block} has an invalid state {state}"
            ));
            continue;
        }
        if !matches!(state, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) {
            continue;
        }
        let block_length = geo
            .block_size
            .min(dev.size().saturating_sub(block * geo.block_size));
        if off >= file_len {
            r.corruptions += 1;
            r.messages.push(format!(
                "VHDX BAT entry {block} start offset {off} points after end of file \
                 ({file_len}). Image has probably been truncated."
            ));
            continue;
        }
        if off.saturating_add(block_length) > file_len {
            r.corruptions += 1;
            r.messages.push(format!(
                "VHDX BAT entry {block} end offset {} points after end of file \
                 ({file_len}). Image has probably been truncated.",
                off.saturating_add(block_length) - 1
            ));
            continue;
        }
        used.push((off, block_length, Some(block)));
    }
    // Sector bitmap blocks (differencing images).
    let chunks = geo.data_blocks.div_ceil(geo.chunk_ratio);
    for chunk in 0..chunks {
        let i = geo.bitmap_index(chunk * geo.chunk_ratio);
        if i >= geo.entries {
            break;
        }
        let e = st.entry(i);
        let (state, off) = (entry_state(e), entry_offset(e));
        if !matches!(state, SB_NOT_PRESENT | SB_PRESENT) {
            r.corruptions += 1;
            r.messages.push(format!(
                "VHDX sector bitmap entry {chunk} has an invalid state {state}"
            ));
        } else if state == SB_PRESENT {
            if off == 0 || off.saturating_add(SB_BLOCK_SIZE) > file_len {
                r.corruptions += 1;
                r.messages.push(format!(
                    "VHDX sector bitmap entry {chunk} points after end of file ({file_len})"
                ));
            } else {
                used.push((off, SB_BLOCK_SIZE, Some(i)));
            }
        }
    }
    used.sort_unstable();
    let mut end = 0u64;
    for (off, len, idx) in &used {
        if *off < end
            && let Some(i) = idx
        {
            r.corruptions += 1;
            r.messages.push(format!(
                "VHDX BAT entry {i} offset overlaps with other metadata or data regions"
            ));
        }
        end = end.max(off.saturating_add(*len));
    }
    // qemu's vhdx check reports no cluster counts; neither do we (same JSON shape).
    Ok(r)
}
