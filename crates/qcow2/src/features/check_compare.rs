//! The comparison half of `check` (qemu's `compare_refcounts`): the references counted
//! against the refcounts on disk, cluster by cluster, and the fixes a repair mode allows.

use diskimg_blockio::RepairMode;

use crate::engine::meta::Meta;
use crate::features::check::{Counter, Notes};

/// A cluster whose refcount differs from the references found.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mismatch {
    /// Cluster index.
    pub(crate) cluster: u64,
    /// The refcount on disk.
    pub(crate) have: u64,
    /// The references counted.
    pub(crate) want: u64,
}

/// The refcount of cluster `c` (in refcount block `ti`) as qemu's `compare_refcounts`
/// reads it: `None` when it cannot be read. A misaligned refcount block is qemu's
/// corruption event, whose line (the first time) joins the findings.
fn read_refcount(m: &mut Meta, notes: &mut Notes, c: u64, ti: u64, writable: bool) -> Option<u64> {
    if let Some(what) = m.refblock_misaligned(ti) {
        if let Some(line) = m.corruption_line(&what, writable) {
            notes.say(format_args!("{line}"));
        }
        return None;
    }
    m.refcount(c).ok()
}

/// Compares the counted references with the refcounts of every cluster inside the file
/// (qemu's `compare_refcounts` without fixing); returns the mismatches and the highest
/// cluster in use by either. A refcount that cannot be read is a check error, as in
/// qemu; under `-r all` it also makes the refcount structures rebuilt.
pub(crate) fn compare(
    m: &mut Meta,
    cnt: &mut Counter,
    repair: RepairMode,
    writable: bool,
) -> (Vec<Mismatch>, u64) {
    let rbe = m.rb_entries();
    // As qemu, only clusters inside the file are compared (refcounts beyond its end
    // are invisible until the file grows over them).
    let top = cnt.file_len.div_ceil(cnt.cs).max(cnt.refs.len() as u64);
    let mut highest = 0u64;
    let mut c = 0u64;
    let mut mismatches: Vec<Mismatch> = Vec::new();
    while c < top {
        let ti = c / rbe;
        let want = usize::try_from(c)
            .ok()
            .and_then(|i| cnt.refs.get(i))
            .copied()
            .unwrap_or(0);
        let Some(have) = read_refcount(m, &mut cnt.notes, c, ti, writable) else {
            cnt.notes.say(format_args!(
                "Can't get refcount for cluster {c}: Input/output error"
            ));
            cnt.notes.report.check_errors += 1;
            cnt.unreadable += 1;
            cnt.rebuild |= repair == RepairMode::All;
            c += 1;
            continue;
        };
        if want > 0 || have > 0 {
            highest = c;
        }
        if have != want {
            let leak = have > want;
            let word = if leak { "Leaked" } else { "ERROR" };
            cnt.notes.say(format_args!(
                "{word} cluster {c} refcount={have} reference={want}"
            ));
            if leak {
                cnt.notes.report.leaks += 1;
            } else {
                cnt.notes.report.corruptions += 1;
            }
            mismatches.push(Mismatch {
                cluster: c,
                have,
                want,
            });
        }
        c += 1;
    }
    (mismatches, highest)
}

/// Fixes what `repair` allows of `mismatches` (qemu's second `compare_refcounts` pass,
/// which prints every mismatch again: "Repairing …" for those it fixes).
pub(crate) fn fix_mismatches(
    m: &mut Meta,
    notes: &mut Notes,
    repair: RepairMode,
    mismatches: &[Mismatch],
) {
    let (maxr, cs) = (m.max_refcount(), m.cs());
    let mut freed = Vec::new();
    for &Mismatch {
        cluster: c,
        have,
        want,
    } in mismatches
    {
        let leak = have > want;
        let allowed = match repair {
            RepairMode::None => false,
            RepairMode::Leaks => leak,
            RepairMode::All => true,
        };
        let word = match (allowed, leak) {
            (true, _) => "Repairing",
            (false, true) => "Leaked",
            (false, false) => "ERROR",
        };
        notes.say(format_args!(
            "{word} cluster {c} refcount={have} reference={want}"
        ));
        if allowed && m.set_refcount(c, want.min(maxr)).is_ok() {
            if leak {
                notes.report.leaks_fixed += 1;
            } else {
                notes.report.corruptions_fixed += 1;
            }
            if want == 0 {
                freed.push((c * cs, cs));
            }
        }
    }
    // As qemu, whose repair frees with `QCOW2_DISCARD_ALWAYS`: the clusters freed are
    // discarded in the image file (a leaked cluster's old contents, the old refcount
    // structures after a rebuild), once their refcount 0 is durable. A hint: a failure
    // only skips it. Not with an external data file (as the snapshot frees).
    if !freed.is_empty() && m.data().is_none() && m.file().flush().is_ok() {
        m.punch_freed(freed);
    }
}
