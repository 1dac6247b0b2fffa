//! `qemu-img check` for VDI: the block map against itself and the header.
//!
//! Exactly qemu's checks (`vdi_co_check`), with its messages and counts: an entry whose
//! data index is not below the block count ("too large"), two entries sharing a data
//! index, and an allocated count in the header that differs from the entries. Each is one
//! corruption. Leaked data blocks are not detected (qemu does not either). Repair is not
//! supported (qemu: ENOTSUP).

use diskimg_blockio::CheckReport;

use crate::bmap::{Meta, is_allocated};

/// Runs the check over the in-memory metadata (read from disk at open, kept in sync
/// with every commit).
pub(crate) fn check(m: &Meta) -> CheckReport {
    let mut report = CheckReport::default();
    let blocks = m.header.blocks;
    // Which guest block first claimed each data index (u32::MAX: none).
    let mut owner: Vec<u32> = vec![u32::MAX; usize::try_from(blocks).unwrap_or(0)];
    let mut allocated: u64 = 0;
    for g in 0..blocks {
        let e = m.entry(g);
        if !is_allocated(e) {
            continue;
        }
        if u64::from(e) < blocks {
            allocated += 1;
            match owner.get_mut(usize::try_from(e).unwrap_or(usize::MAX)) {
                Some(slot) if *slot == u32::MAX => *slot = e,
                Some(slot) => {
                    report
                        .messages
                        .push(format!("ERROR: block index {} also used by {e}", *slot));
                    report.corruptions += 1;
                }
                None => {}
            }
        } else {
            report
                .messages
                .push(format!("ERROR: block index {g} too large, is {e}"));
            report.corruptions += 1;
        }
    }
    if allocated != m.header.allocated {
        report.messages.push(format!(
            "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
            m.header.allocated
        ));
        report.corruptions += 1;
    }
    report
}
