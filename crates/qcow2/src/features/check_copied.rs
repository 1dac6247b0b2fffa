//! The OFLAG_COPIED pass of `check` (qemu's `check_oflag_copied`): after the refcounts are
//! compared (and fixed), every active L1 and L2 entry must carry the COPIED flag exactly
//! when its cluster's refcount is 1.
//!
//! The pass re-reads one L2 table at a time instead of remembering the entries of the
//! counting walk, so its memory is one cluster whatever the tables claim (an L1 table
//! whose entries all name one full L2 table describes terabytes of "allocated" clusters
//! in a file of a few hundred KiB).

use std::collections::HashSet;

use diskimg_blockio::{RepairMode, Result};

use crate::device::Qcow2Device;
use crate::disk::table::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::engine::meta::Meta;
use crate::features::check::Notes;

/// Whether the pass may rewrite flags: always for `-r all`; for `-r leaks` only when the
/// refcount repair left nothing unfixed (the refcounts are then exact), as qemu.
pub(crate) fn may_repair(repair: RepairMode, notes: &Notes) -> bool {
    let r = &notes.report;
    match repair {
        RepairMode::None => false,
        RepairMode::All => true,
        RepairMode::Leaks => {
            r.check_errors == 0 && r.corruptions == r.corruptions_fixed && r.leaks == r.leaks_fixed
        }
    }
}

/// Checks (and with `fix`, repairs) the COPIED flags of the active table `l1`, found at
/// `l1_offset`. Returns whether anything was rewritten.
pub(crate) fn check_copied(
    dev: &Qcow2Device,
    m: &mut Meta,
    notes: &mut Notes,
    l1: &[u64],
    l1_offset: u64,
    fix: bool,
) -> Result<bool> {
    let cs = m.cs();
    let word = if fix { "Repairing" } else { "ERROR" };
    let mut rewritten = false;
    // L2 tables found clean: another L1 entry naming one (a hostile image can name one
    // table from every entry) has nothing new to report, as refcounts do not change
    // during this pass. Bounded by the clusters of the file.
    let mut clean: HashSet<u64> = HashSet::new();
    for (i, &l1e) in l1.iter().enumerate() {
        let l2 = l1e & L1E_OFFSET_MASK;
        if l2 == 0 || !l2.is_multiple_of(cs) {
            continue;
        }
        // qemu: a refcount that cannot be read is neither reported nor counted.
        let Ok(rc) = m.refcount(l2 / cs) else {
            continue;
        };
        if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
            notes.report.corruptions += 1;
            notes.say(format_args!(
                "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
            ));
            if fix {
                let e = if rc == 1 {
                    l1e | OFLAG_COPIED
                } else {
                    l1e & !OFLAG_COPIED
                };
                let at =
                    l1_offset
                        .checked_add(i as u64 * 8)
                        .ok_or(diskimg_blockio::Error::corrupt(
                            "qcow2",
                            "L1 table offset overflows",
                            l1_offset,
                        ))?;
                dev.file.write_all_at(&e.to_be_bytes(), at)?;
                notes.report.corruptions_fixed += 1;
                rewritten = true;
            }
        }
        if clean.contains(&l2) {
            continue;
        }
        let Ok(mut t) = m.read_table("L2 table", l2, cs / 8) else {
            notes.report.check_errors += 1;
            continue;
        };
        let found = notes.report.corruptions;
        let dirty = check_l2(m, notes, &mut t, word, fix);
        if notes.report.corruptions == found {
            clean.insert(l2);
        }
        if dirty > 0 {
            let bytes: Vec<u8> = t.iter().flat_map(|e| e.to_be_bytes()).collect();
            dev.file.write_all_at(&bytes, l2)?;
            notes.report.corruptions_fixed += dirty;
            rewritten = true;
        }
    }
    Ok(rewritten)
}

/// The data entries of one L2 table `t`; flips the flags in `t` when fixing and returns
/// how many it flipped.
fn check_l2(m: &mut Meta, notes: &mut Notes, t: &mut [u64], word: &str, fix: bool) -> u64 {
    let cs = m.cs();
    let step = if m.h().extended_l2() { 2 } else { 1 };
    let mut dirty = 0;
    for k in (0..t.len()).step_by(step) {
        let Some(&e) = t.get(k) else { break };
        if e & OFLAG_COMPRESSED != 0 {
            continue;
        }
        let off = e & L2E_OFFSET_MASK;
        let external = m.data().is_some();
        if (off == 0 && !(external && e & OFLAG_COPIED != 0)) || !off.is_multiple_of(cs) {
            continue;
        }
        // Clusters of an external data file always have refcount 1.
        let rc = if external {
            1
        } else {
            match m.refcount(off / cs) {
                Ok(rc) => rc,
                Err(_) => continue,
            }
        };
        if (rc == 1) != (e & OFLAG_COPIED != 0) {
            notes.report.corruptions += 1;
            notes.say(format_args!(
                "{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
            ));
            if fix && let Some(slot) = t.get_mut(k) {
                *slot = e ^ OFLAG_COPIED;
                dirty += 1;
            }
        }
    }
    dirty
}
