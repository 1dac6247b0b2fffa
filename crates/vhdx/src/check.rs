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
    let geo = &dev.geo;
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
    let mut allocated = 0u64;
    for i in 0..geo.entries {
        let e = st.entry(i);
        let state = entry_state(e);
        let off = entry_offset(e);
        let (len, present, valid) = if geo.is_bitmap_index(i) {
            (
                SB_BLOCK_SIZE,
                state == SB_PRESENT,
                matches!(state, SB_NOT_PRESENT | SB_PRESENT),
            )
        } else {
            let present = matches!(state, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT);
            let valid = matches!(
                state,
                PAYLOAD_NOT_PRESENT
                    | PAYLOAD_UNDEFINED
                    | PAYLOAD_ZERO
                    | PAYLOAD_UNMAPPED
                    | PAYLOAD_FULLY_PRESENT
            ) || (state == PAYLOAD_PARTIALLY_PRESENT && dev.meta.has_parent);
            if present {
                allocated += 1;
            }
            (geo.block_size, present, valid)
        };
        if !valid {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR VHDX BAT entry {i} has an invalid state {state}"
            ));
            continue;
        }
        if !present {
            continue;
        }
        if off == 0 || off.checked_add(len).is_none_or(|end| end > file_len) {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR VHDX BAT entry {i} offset points after end of file ({off}). \
                 Image has probably been truncated."
            ));
            continue;
        }
        used.push((off, len, Some(i)));
    }
    used.sort_unstable();
    let mut end = 0u64;
    for (off, len, idx) in &used {
        if *off < end
            && let Some(i) = idx
        {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR VHDX BAT entry {i} offset overlaps with other metadata or data regions"
            ));
        }
        end = end.max(off.saturating_add(*len));
    }
    r.allocated_clusters = Some(allocated);
    r.total_clusters = Some(geo.data_blocks);
    r.image_end_offset = Some(file_len);
    Ok(r)
}
