//! `check`'s pass over the snapshot table, before and after the refcount check, as
//! qemu's `qcow2_check_read_snapshot_table` and `qcow2_check_fix_snapshot_table`: the
//! table is read again from the header's fields (an image opened for `check` opens even
//! when its table is refused); without `-r all` a table qemu refuses fails the check
//! (EFBIG); with it, too much extra data is cut to 1024 bytes, snapshots beyond 64 MiB of
//! table are dropped (the header's count first: their clusters leak and the refcount
//! check frees them), v3 entries without the disk size get it, and the table is written
//! anew after the refcounts are fixed. [`count_snapshot`] counts each snapshot's
//! references for the refcount check.

use diskimg_blockio::{CheckReport, Error, RepairMode, Result};

use crate::device::Qcow2Device;
use crate::disk::snapshot::{
    L1Problem, Snapshot, TableRepairs, read_snapshots, read_snapshots_repairing,
};
use crate::engine::meta::Meta;
use crate::features::check::{Counter, walk_l1};
use crate::features::snapshot_ops::{completed, extra_len, write_table};

/// The first half's findings, kept for [`finish`].
#[derive(Debug, Default)]
pub(crate) struct TablePass {
    messages: Vec<String>,
    /// Corruptions found (not yet fixed).
    corruptions: u64,
    /// Overhanging snapshots dropped (fixed already, in the header).
    reduced: u64,
}

/// Reads the snapshot table again as the check does; `Err` when the check cannot go on
/// (the report says why: qemu's `ERROR failed to read the snapshot table: …`).
pub(crate) fn read_pass(
    dev: &Qcow2Device,
    repair: RepairMode,
) -> Result<std::result::Result<TablePass, CheckReport>> {
    let mut m = dev.lock();
    let mut h = m.h().clone();
    let limits = m.limits();
    let mut fixes = TableRepairs::default();
    let fixing = repair == RepairMode::All && !dev.read_only;
    if h.nb_snapshots > MAX_SNAPSHOTS && fixing {
        let over = h.nb_snapshots - MAX_SNAPSHOTS;
        fixes
            .messages
            .push(format!("Discarding {over} overhanging snapshots"));
        fixes.reduced += over;
        h.nb_snapshots = MAX_SNAPSHOTS;
    }
    if let Err(e) = h.validate_snapshot_table("snapshot table") {
        let mut msg = format!("ERROR {}", words(&e));
        if h.nb_snapshots > MAX_SNAPSHOTS {
            msg.push_str(&format!(
                "\nYou can force-remove all {} overhanging snapshots with qemu-img check -r all",
                h.nb_snapshots - MAX_SNAPSHOTS
            ));
        }
        return Ok(Err(failed(msg)));
    }
    let read = if fixing {
        read_snapshots_repairing(m.file().as_ref(), &h, &limits, &mut fixes)
    } else {
        read_snapshots(m.file().as_ref(), &h, &limits)
    };
    let (snaps, len) = match read {
        Ok(v) => v,
        Err(e) if e.is_bad_image() => {
            let msg = format!("ERROR failed to read the snapshot table: {}", words(&e));
            return Ok(Err(failed(msg)));
        }
        Err(e) => return Err(e),
    };
    let mut pass = TablePass {
        messages: fixes.messages,
        corruptions: u64::from(fixes.extra_dropped),
        reduced: u64::from(fixes.reduced),
    };
    if fixes.reduced > 0 {
        // The header's count first (qemu's order): the dropped snapshots' clusters leak
        // and the refcount check frees them.
        let nb = u32::try_from(snaps.len()).map_err(|_| Error::invalid("snapshot count"))?;
        m.file().write_all_at(&nb.to_be_bytes(), 60)?;
        m.file().flush()?;
    }
    if h.version >= 3 {
        let word = if repair == RepairMode::All {
            "Repairing"
        } else {
            "ERROR"
        };
        for (i, s) in snaps.iter().enumerate() {
            if extra_len(&s.raw) < 16 {
                pass.corruptions += 1;
                pass.messages
                    .push(format!("{word} snapshot table entry {i} is incomplete"));
            }
        }
    }
    if fixes.reduced > 0 {
        m.replace_snapshots(snaps, h.snapshots_offset, len);
    } else {
        m.set_snapshots(snaps, len);
    }
    Ok(Ok(pass))
}

/// qemu's `QCOW_MAX_SNAPSHOTS`.
const MAX_SNAPSHOTS: u32 = 65536;

/// A corruption's bare words.
fn words(e: &Error) -> String {
    match e {
        Error::Corrupt { what, .. } => what.to_string(),
        e => e.to_string(),
    }
}

/// The report of a check that stops at the table (one check error; the CLI prints the
/// message and fails as qemu-img does).
fn failed(message: String) -> CheckReport {
    CheckReport {
        check_errors: 1,
        messages: vec![message],
        ..CheckReport::default()
    }
}

/// Merges the pass into the refcount check's `report`; with `-r all` and corruptions,
/// writes the repaired table (qemu's `qcow2_write_snapshots`).
pub(crate) fn finish(
    dev: &Qcow2Device,
    repair: RepairMode,
    pass: TablePass,
    report: &mut CheckReport,
) -> Result<()> {
    let mut messages = pass.messages;
    messages.append(&mut report.messages);
    report.messages = messages;
    report.corruptions += pass.corruptions + pass.reduced;
    report.corruptions_fixed += pass.reduced;
    if pass.corruptions > 0 && repair == RepairMode::All && !dev.read_only {
        let mut m = dev.lock();
        let size = m.size();
        let snaps = m
            .snapshots()
            .iter()
            .cloned()
            .map(|s| completed(s, size))
            .collect();
        write_table(&mut m, snaps)?;
        m.file().flush()?;
        report.corruptions_fixed += pass.corruptions;
    }
    Ok(())
}

/// Counts one snapshot's L1 table and what it references; an unusable L1 reference is
/// a corruption of the snapshot table entry (qemu's words), and nothing is counted.
pub(crate) fn count_snapshot(m: &mut Meta, cnt: &mut Counter, s: &Snapshot) {
    let (id, name) = (&s.info.id, &s.info.name);
    if !s.l1_offset.is_multiple_of(m.cs()) {
        cnt.notes.report.corruptions += 1;
        cnt.notes.say(format_args!(
            "ERROR snapshot {id} ({name}) l1_offset={:#x}: L1 table is not cluster aligned; \
             snapshot table entry corrupted",
            s.l1_offset
        ));
        return;
    }
    if s.l1_problem(m.cs()) == Some(L1Problem::TooLarge) {
        cnt.notes.report.corruptions += 1;
        cnt.notes.say(format_args!(
            "ERROR snapshot {id} ({name}) l1_size={:#x}: L1 table is too large; snapshot \
             table entry corrupted",
            s.l1_size
        ));
        return;
    }
    cnt.inc(s.l1_offset, u64::from(s.l1_size) * 8);
    match m.read_table("snapshot L1 table", s.l1_offset, u64::from(s.l1_size)) {
        Ok(sl1) => walk_l1(m, cnt, &sl1, false),
        Err(_) => cnt.notes.report.check_errors += 1,
    }
}
