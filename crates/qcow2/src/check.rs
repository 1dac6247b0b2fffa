//! `check`: recount every reference (header, tables, snapshots, bitmaps, data) and compare
//! with the refcounts, as qemu's `qcow2_check_refcounts`; optionally fix the counts.

use diskimg_blockio::{CheckReport, RepairMode, Result};

use crate::device::Qcow2Device;
use crate::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::meta::Meta;
use crate::refcount::REFT_OFFSET_MASK;
use crate::table::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};

struct Counter {
    refs: Vec<u64>,
    cs: u64,
    file_len: u64,
    report: CheckReport,
}

impl Counter {
    fn inc(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let Some(end) = off.checked_add(len) else {
            self.report.corruptions += 1;
            return;
        };
        if end.saturating_sub(self.file_len) >= self.cs {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {off:#x} size {len:#x}"
            ));
            return;
        }
        for c in off / self.cs..=(end - 1) / self.cs {
            match usize::try_from(c).ok().and_then(|c| self.refs.get_mut(c)) {
                Some(r) => *r = r.saturating_add(1),
                None => self.report.corruptions += 1,
            }
        }
    }
}

/// (cluster, table entry, the entry's file offset, L1 index for L2 tables).
type Copied = (u64, u64, u64, Option<usize>);

/// Walks one L1 table: counts its L2 tables and their clusters. For the active table,
/// also returns (cluster, entry, entry's file offset) for the COPIED flag check.
fn walk_l1(
    m: &mut Meta,
    cnt: &mut Counter,
    l1: &[u64],
    active: bool,
    copied: &mut Vec<Copied>,
    l1_offset: u64,
) -> Result<()> {
    let cs = m.cs();
    let ext = m.h.extended_l2();
    let x = 62 - (m.h.cluster_bits - 8);
    for (l1i, &l1e) in l1.iter().enumerate() {
        let l2 = l1e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !l2.is_multiple_of(cs) {
            cnt.report.corruptions += 1;
            cnt.report.messages.push(format!(
                "ERROR l2_offset={l2:#x}: Table is not cluster aligned"
            ));
            continue;
        }
        cnt.inc(l2, cs);
        if active {
            copied.push((l2 / cs, l1e, l1_offset + l1i as u64 * 8, Some(l1i)));
        }
        let t = match m.read_table("L2 table", l2, cs / 8) {
            Ok(t) => t,
            Err(_) => {
                cnt.report.check_errors += 1;
                continue;
            }
        };
        let step = if ext { 2 } else { 1 };
        // qemu counts fragmentation within each L2 table.
        let mut last_host = 0u64;
        for (k, e) in t.iter().step_by(step).copied().enumerate() {
            if e & OFLAG_COMPRESSED != 0 {
                let off = e & ((1u64 << x) - 1);
                let sectors = ((e & !(OFLAG_COMPRESSED | OFLAG_COPIED)) >> x) + 1;
                cnt.inc(off & !511, sectors * 512);
                if active {
                    if let Some(c) = cnt.report.compressed_clusters.as_mut() {
                        *c += 1;
                    }
                    if let Some(c) = cnt.report.allocated_clusters.as_mut() {
                        *c += 1;
                    }
                    // As qemu: compressed clusters count as fragmented.
                    if let Some(c) = cnt.report.fragmented_clusters.as_mut() {
                        *c += 1;
                    }
                }
                continue;
            }
            let off = e & L2E_OFFSET_MASK;
            let alloc = off != 0 || (m.data.is_some() && e & OFLAG_COPIED != 0);
            if !alloc {
                continue;
            }
            if !off.is_multiple_of(cs) {
                cnt.report.corruptions += 1;
                cnt.report.messages.push(format!(
                    "ERROR offset={off:#x}: Cluster is not properly aligned; L2 entry corrupted."
                ));
                continue;
            }
            if active {
                if let Some(c) = cnt.report.allocated_clusters.as_mut() {
                    *c += 1;
                }
                if last_host != 0
                    && off != last_host + cs
                    && let Some(c) = cnt.report.fragmented_clusters.as_mut()
                {
                    *c += 1;
                }
                last_host = off;
            }
            if m.data.is_none() {
                cnt.inc(off, cs);
                if active {
                    copied.push((off / cs, e, l2 + k as u64 * step as u64 * 8, None));
                }
            }
        }
    }
    Ok(())
}

/// Checks (and with `repair`, fixes) the refcounts of `dev`.
pub(crate) fn check(dev: &Qcow2Device, repair: RepairMode) -> Result<CheckReport> {
    check_inner(dev, repair, true)
}

fn check_inner(dev: &Qcow2Device, repair: RepairMode, may_rebuild: bool) -> Result<CheckReport> {
    let mut m = dev.lock();
    if !dev.read_only {
        m.commit_deferred()?;
    }
    let cs = m.cs();
    let file_len = dev.file.len()?;
    let nclusters = file_len.div_ceil(cs);
    let refs = m
        .limits
        .alloc_elems::<u64>("check reference table", nclusters, 8)?;
    let mut cnt = Counter {
        refs,
        cs,
        file_len,
        report: CheckReport {
            allocated_clusters: Some(0),
            total_clusters: Some(m.h.size.div_ceil(cs)),
            fragmented_clusters: Some(0),
            compressed_clusters: Some(0),
            ..CheckReport::default()
        },
    };
    cnt.inc(0, cs);
    let h = m.h.clone();
    let l1 = m.read_table("L1 table", h.l1_table_offset, u64::from(h.l1_size))?;
    cnt.inc(h.l1_table_offset, u64::from(h.l1_size) * 8);
    let mut copied = Vec::new();
    walk_l1(&mut m, &mut cnt, &l1, true, &mut copied, h.l1_table_offset)?;
    if h.nb_snapshots > 0 {
        cnt.inc(h.snapshots_offset, m.snapshot_table_len);
    }
    let snapshots = m.snapshots.clone();
    for s in &snapshots {
        cnt.inc(s.l1_offset, u64::from(s.l1_size) * 8);
        match m.read_table("snapshot L1 table", s.l1_offset, u64::from(s.l1_size)) {
            Ok(sl1) => walk_l1(&mut m, &mut cnt, &sl1, false, &mut Vec::new(), s.l1_offset)?,
            Err(_) => cnt.report.check_errors += 1,
        }
    }
    cnt.inc(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    let reftable = m.reftable.clone();
    for e in &reftable {
        let off = e & REFT_OFFSET_MASK;
        if off != 0 {
            cnt.inc(off, cs);
        }
    }
    if let Some(b) = h.ext.bitmaps.filter(|_| !dev.bitmaps.is_empty()) {
        cnt.inc(b.directory_offset, b.directory_size);
        for bm in &dev.bitmaps {
            cnt.inc(bm.table_offset, u64::from(bm.table_size) * 8);
            if let Ok(t) = m.read_table("bitmap table", bm.table_offset, u64::from(bm.table_size)) {
                for e in t {
                    let off = e & L2E_OFFSET_MASK;
                    if off != 0 {
                        cnt.inc(off, cs);
                    }
                }
            }
        }
    }
    if let Some((off, len)) = h.ext.crypto {
        cnt.inc(off, len);
    }
    // Compare with the refcounts.
    let rbe = m.rb_entries();
    // As qemu, only clusters inside the file are compared (refcounts beyond its end
    // are invisible until the file grows over them).
    let top = nclusters;
    let mut highest = 0u64;
    let mut c = 0u64;
    let mut budget: u64 = 1 << 26;
    // (cluster, refcount, references) of every mismatch, fixed after the scan.
    let mut mismatches: Vec<(u64, u64, u64)> = Vec::new();
    while c < top {
        let ti = c / rbe;
        budget = budget.saturating_sub(1);
        if budget == 0 {
            cnt.report.check_errors += 1;
            break;
        }
        let has_block = reftable
            .get(usize::try_from(ti).unwrap_or(usize::MAX))
            .is_some_and(|e| e & REFT_OFFSET_MASK != 0);
        if !has_block && c >= nclusters {
            c = (ti + 1) * rbe;
            continue;
        }
        let want = usize::try_from(c)
            .ok()
            .and_then(|i| cnt.refs.get(i))
            .copied()
            .unwrap_or(0);
        if want > 0 {
            highest = c;
        }
        let have = match m.refcount(c) {
            Ok(v) => v,
            Err(_) if repair == RepairMode::All && may_rebuild => {
                // An unusable refcount block (misaligned, beyond the end of the file):
                // its clusters count as refcount 0, which makes the repair rebuild.
                cnt.report.messages.push(format!(
                    "ERROR refcount block {ti} is unusable; its refcounts are rebuilt"
                ));
                0
            }
            Err(_) => {
                cnt.report.check_errors += 1;
                c = (ti + 1) * rbe;
                continue;
            }
        };
        if have != want {
            let leak = have > want;
            cnt.report.messages.push(format!(
                "{} cluster {c} refcount={have} reference={want}",
                if leak { "Leaked" } else { "ERROR" }
            ));
            if leak {
                cnt.report.leaks += 1;
            } else {
                cnt.report.corruptions += 1;
            }
            mismatches.push((c, have, want));
        }
        c += 1;
    }
    // A referenced cluster with refcount 0 needs the refcount structures rebuilt, which
    // only `-r all` may do: qemu refuses `-r leaks` then (check error, EIO).
    if repair == RepairMode::Leaks && mismatches.iter().any(|&(_, have, _)| have == 0) {
        cnt.report
            .messages
            .push("ERROR need to rebuild refcount structures".into());
        cnt.report.check_errors += 1;
        return Ok(cnt.report);
    }
    // As qemu: a referenced cluster with refcount 0 means the refcount structures are
    // rebuilt from the counted references, then the old ones are freed as leaks.
    if repair == RepairMode::All && may_rebuild && mismatches.iter().any(|&(_, have, _)| have == 0)
    {
        let old = cnt.report;
        let mut refs = cnt.refs;
        crate::rebuild::rebuild(&mut m, &mut refs)?;
        drop(m);
        let fresh = check_inner(dev, RepairMode::All, false)?;
        let mut messages = old.messages;
        messages.push("Rebuilding refcount structure".into());
        // qemu compares once more after rebuilding, repairing the old structures'
        // leaks: only the fresh check's "Repairing" pass is printed.
        messages.extend(
            fresh
                .messages
                .iter()
                .filter(|s| !s.starts_with("Leaked cluster"))
                .cloned(),
        );
        return Ok(CheckReport {
            corruptions: old.corruptions + fresh.corruptions,
            leaks: old.leaks,
            corruptions_fixed: old.corruptions + fresh.corruptions_fixed,
            leaks_fixed: old.leaks,
            check_errors: old.check_errors + fresh.check_errors,
            messages,
            ..fresh
        });
    }
    for &(c, have, want) in &mismatches {
        let leak = have > want;
        let fix = match repair {
            RepairMode::None => false,
            RepairMode::Leaks => leak,
            RepairMode::All => true,
        };
        if repair != RepairMode::None {
            // qemu compares a second time when repairing, naming what it fixes.
            let what = match (fix, leak) {
                (true, _) => "Repairing",
                (false, true) => "Leaked",
                (false, false) => "ERROR",
            };
            cnt.report.messages.push(format!(
                "{what} cluster {c} refcount={have} reference={want}"
            ));
        }
        let maxr = m.max_refcount();
        if fix && m.set_refcount(c, want.min(maxr)).is_ok() {
            if leak {
                cnt.report.leaks_fixed += 1;
            } else {
                cnt.report.corruptions_fixed += 1;
            }
        }
    }
    let mut flags_fixed = false;
    for (c, e, at, l1i) in copied {
        let rc = m.refcount(c).unwrap_or(0);
        let flag = e & OFLAG_COPIED != 0;
        if (rc == 1) != flag {
            cnt.report.corruptions += 1;
            // qemu's wording: "Repairing" for what -r all fixes, "ERROR" otherwise.
            let what = if repair == RepairMode::All {
                "Repairing"
            } else {
                "ERROR"
            };
            cnt.report.messages.push(match l1i {
                Some(i) => {
                    format!(
                        "{what} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                    )
                }
                None => format!("{what} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"),
            });
            if repair == RepairMode::All {
                let fixed = if rc == 1 {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                dev.file.write_all_at(&fixed.to_be_bytes(), at)?;
                cnt.report.corruptions_fixed += 1;
                flags_fixed = true;
            }
        }
    }
    if flags_fixed {
        // Reload what the caches hold of the rewritten tables.
        m.l2 = crate::table::L2Cache::new(
            usize::try_from(m.limits.max_cache_bytes / cs).unwrap_or(16),
        );
        m.l1 = m.read_table("L1 table", h.l1_table_offset, u64::from(h.l1_size))?;
    }
    if repair != RepairMode::None {
        dev.file.flush()?;
    }
    cnt.report.image_end_offset = Some((highest + 1) * cs);
    let r = &cnt.report;
    if repair != RepairMode::None && r.check_errors == 0 && r.corruptions == r.corruptions_fixed {
        // As qemu after a successful repair: the image is clean and consistent again.
        let cleared = m.h.incompatible & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        if cleared != m.h.incompatible {
            dev.file.flush()?;
            dev.file.write_all_at(&cleared.to_be_bytes(), 72)?;
            dev.file.flush()?;
            m.h.incompatible = cleared;
        }
    }
    // As qemu-img's ImageCheck: statistics that are zero are absent.
    let r = &mut cnt.report;
    for v in [
        &mut r.allocated_clusters,
        &mut r.fragmented_clusters,
        &mut r.compressed_clusters,
        &mut r.total_clusters,
    ] {
        if *v == Some(0) {
            *v = None;
        }
    }
    Ok(cnt.report)
}
