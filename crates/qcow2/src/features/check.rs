//! `check`: recount every reference (header, tables, snapshots, bitmaps, data) and compare
//! with the refcounts, as qemu's `qcow2_check_refcounts`; optionally fix the counts.
//!
//! Memory is bounded by the file: one counter per host cluster, one table at a time, and
//! at most [`MAX_MESSAGES`] findings kept (a hostile image can claim billions of
//! references to a handful of clusters; qemu prints a line for each, we keep the first
//! ones and count the rest).

use diskimg_blockio::{CheckReport, RepairMode, Result};

use crate::device::Qcow2Device;
use crate::disk::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::disk::table::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, REFT_OFFSET_MASK,
};
use crate::engine::meta::Meta;
use crate::features::check_compare::{compare, fix_mismatches};
use crate::features::check_copied::{check_copied, may_repair};
use crate::features::check_snapshots::count_snapshot;

/// L1 entry bits no version of the spec defines (1-8 and 56-62; spec "L1 table",
/// qemu's `L1E_RESERVED_MASK`).
const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard cluster descriptor bits no version of the spec defines (1-8 and 56-61;
/// spec "Standard Cluster Descriptor", qemu's `L2E_STD_RESERVED_MASK`).
const L2E_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Refcount table entry bits no version of the spec defines (0-8; qemu's
/// `REFT_RESERVED_MASK`).
const REFT_RESERVED: u64 = 0x1ff;

/// Findings kept in a report; further ones are counted in one closing line.
pub(crate) const MAX_MESSAGES: usize = 10_000;

/// The report under construction, with its message cap.
#[derive(Default)]
pub(crate) struct Notes {
    pub(crate) report: CheckReport,
    dropped: u64,
}

impl Notes {
    /// Records a finding (kept while fewer than [`MAX_MESSAGES`] are).
    pub(crate) fn say(&mut self, msg: std::fmt::Arguments<'_>) {
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(msg.to_string());
        } else {
            self.dropped += 1;
        }
    }

    /// The report, with a line counting the findings that were not kept.
    fn finish(mut self) -> CheckReport {
        if self.dropped > 0 {
            self.report
                .messages
                .push(format!("({} further messages not shown)", self.dropped));
        }
        self.report
    }
}

pub(crate) struct Counter {
    pub(crate) refs: Vec<u64>,
    pub(crate) cs: u64,
    pub(crate) file_len: u64,
    /// The largest refcount the image's width holds: counting stops there (qemu's
    /// "overflow cluster"), as a repair could not store more.
    max: u64,
    pub(crate) notes: Notes,
    /// `-r all`: L2 entries qemu fixes while counting are fixed.
    fix: bool,
    /// An L2 entry was rewritten on disk (the L2 cache is stale).
    rewrote: bool,
    /// A refcount block is also used as something else: the refcount structures must
    /// be rebuilt (qemu's `check_refblocks` setting `rebuild`).
    pub(crate) rebuild: bool,
    /// Clusters whose refcount could not be read (each a check error).
    pub(crate) unreadable: u64,
}

impl Counter {
    pub(crate) fn inc(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let Some(end) = off.checked_add(len) else {
            self.notes.report.corruptions += 1;
            return;
        };
        if end.saturating_sub(self.file_len) >= self.cs {
            self.notes.report.corruptions += 1;
            self.notes.say(format_args!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {off:#x} size {len:#x}"
            ));
            return;
        }
        for c in off / self.cs..=(end - 1) / self.cs {
            // As qemu, the last cluster may lie partly past the end of the file: the
            // counters grow to cover it (less than one cluster past it, checked above).
            if let Ok(i) = usize::try_from(c)
                && i >= self.refs.len()
                && i <= self.refs.len() + 1
            {
                self.refs.resize(i + 1, 0);
            }
            match usize::try_from(c).ok().and_then(|c| self.refs.get_mut(c)) {
                Some(r) if *r >= self.max => {
                    self.notes.report.corruptions += 1;
                    self.notes.say(format_args!(
                        "ERROR: overflow cluster offset={:#x}\nUse qemu-img amend to increase \
                         the refcount entry width or qemu-img convert to create a clean copy \
                         if the image cannot be opened for writing",
                        c * self.cs
                    ));
                }
                Some(r) => *r += 1,
                None => self.notes.report.corruptions += 1,
            }
        }
    }
}

/// Walks one L1 table: counts its L2 tables and their clusters (and, for the active
/// table, the allocation statistics). One L2 table is in memory at a time.
pub(crate) fn walk_l1(m: &mut Meta, cnt: &mut Counter, l1: &[u64], active: bool) {
    let cs = m.cs();
    for &l1e in l1 {
        if l1e & L1E_RESERVED != 0 {
            cnt.notes.report.corruptions += 1;
            cnt.notes.say(format_args!(
                "ERROR found L1 entry with reserved bits set: {l1e:x}"
            ));
        }
        let l2 = l1e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        // As qemu's `check_refcounts_l1`: counted, reported, and walked where the entry
        // points (what lies there is judged as an L2 table).
        cnt.inc(l2, cs);
        if !l2.is_multiple_of(cs) {
            cnt.notes.report.corruptions += 1;
            cnt.notes.say(format_args!(
                "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
            ));
        }
        match m.read_table("L2 table", l2, cs / 8) {
            Ok(t) => walk_l2(m, cnt, l2, &t, active),
            Err(_) => cnt.notes.report.check_errors += 1,
        }
    }
}

/// Subcluster bitmap halves of an extended L2 entry (spec "Extended L2 Entries").
const ALL_ALLOC: u64 = 0xffff_ffff;
const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// Counts the clusters the L2 table `t` (at host offset `l2`) references, with qemu's
/// findings per entry (`check_refcounts_l2`); with `cnt.fix`, an unaligned preallocated
/// cluster becomes a zero cluster (qemu's `fix_l2_entry_by_zero`).
fn walk_l2(m: &Meta, cnt: &mut Counter, l2: u64, t: &[u64], active: bool) {
    let cs = m.cs();
    let x = 62 - (m.h().cluster_bits - 8);
    let ext = m.h().extended_l2();
    let step = if ext { 2 } else { 1 };
    // qemu counts fragmentation within each L2 table.
    let mut last_host = 0u64;
    for (i, k) in (0..t.len()).step_by(step).enumerate() {
        let e = t.get(k).copied().unwrap_or(0);
        let bm = if ext {
            t.get(k + 1).copied().unwrap_or(0)
        } else {
            0
        };
        let stat = |c: &mut Option<u64>| {
            if active && let Some(c) = c.as_mut() {
                *c += 1;
            }
        };
        if e & OFLAG_COMPRESSED == 0 && e & L2E_STD_RESERVED != 0 {
            cnt.notes.report.corruptions += 1;
            cnt.notes.say(format_args!(
                "ERROR found l2 entry with reserved bits set: {e:x}"
            ));
        }
        if e & OFLAG_COMPRESSED != 0 {
            if e & OFLAG_COPIED != 0 {
                cnt.notes.report.corruptions += 1;
                cnt.notes.say(format_args!(
                    "ERROR: coffset={:#x}: copied flag must never be set for compressed \
                     clusters",
                    e & ((1u64 << x) - 1)
                ));
            }
            if bm != 0 {
                cnt.notes.report.corruptions += 1;
                cnt.notes.say(format_args!(
                    "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, \
                     entry={e:#x}"
                ));
                continue;
            }
            let off = e & ((1u64 << x) - 1);
            let sectors = ((e & !(OFLAG_COMPRESSED | OFLAG_COPIED)) >> x) + 1;
            // As qemu: compressed clusters count as fragmented.
            stat(&mut cnt.notes.report.compressed_clusters);
            stat(&mut cnt.notes.report.allocated_clusters);
            stat(&mut cnt.notes.report.fragmented_clusters);
            cnt.inc(off & !511, sectors * 512);
            continue;
        }
        let off = e & L2E_OFFSET_MASK;
        if off == 0 && !(m.data().is_some() && e & OFLAG_COPIED != 0) {
            continue;
        }
        if (bm >> 32) & bm != 0 {
            cnt.notes.report.corruptions += 1;
            cnt.notes.say(format_args!(
                "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation \
                 bitmap"
            ));
        }
        if !off.is_multiple_of(cs) && unaligned(m, cnt, (l2, i), e, bm) {
            continue;
        }
        stat(&mut cnt.notes.report.allocated_clusters);
        if last_host != 0 && off != last_host + cs {
            stat(&mut cnt.notes.report.fragmented_clusters);
        }
        last_host = off;
        if m.data().is_none() {
            cnt.inc(off, cs);
        }
    }
}

/// An L2 entry (`at`: table offset and index) with an unaligned host offset: a
/// corruption; one holding no data is made a zero cluster when fixing (true: it
/// references nothing now). qemu still counts the clusters of the others.
fn unaligned(m: &Meta, cnt: &mut Counter, at: (u64, usize), e: u64, bm: u64) -> bool {
    let off = e & L2E_OFFSET_MASK;
    let ext = m.h().extended_l2();
    cnt.notes.report.corruptions += 1;
    let data = if ext {
        bm & ALL_ALLOC != 0
    } else {
        e & OFLAG_ZERO == 0
    };
    if data {
        cnt.notes.say(format_args!(
            "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."
        ));
        return false;
    }
    let word = if cnt.fix { "Repairing" } else { "ERROR" };
    cnt.notes.say(format_args!(
        "{word} offset={off:x}: Preallocated cluster is not properly aligned; L2 entry \
         corrupted."
    ));
    if !cnt.fix {
        return false;
    }
    let mut bytes = Vec::new();
    if ext {
        bytes.extend_from_slice(&0u64.to_be_bytes());
        bytes.extend_from_slice(&((bm | bm << 32) & ALL_ZERO).to_be_bytes());
    } else {
        bytes.extend_from_slice(&OFLAG_ZERO.to_be_bytes());
    }
    let pos = at.0 + at.1 as u64 * bytes.len() as u64;
    match m
        .file()
        .write_all_at(&bytes, pos)
        .and_then(|()| m.file().flush())
    {
        Ok(()) => {
            cnt.notes.report.corruptions -= 1;
            cnt.notes.report.corruptions_fixed += 1;
            cnt.rewrote = true;
            true
        }
        Err(e) => {
            cnt.notes.report.check_errors += 1;
            cnt.notes.say(format_args!(
                "ERROR: Failed to overwrite L2 table entry: {e}"
            ));
            false
        }
    }
}

/// Checks (and with `repair`, fixes) the refcounts of `dev`.
pub(crate) fn check(dev: &Qcow2Device, repair: RepairMode) -> Result<CheckReport> {
    let pass = match crate::features::check_snapshots::read_pass(dev, repair)? {
        Ok(pass) => pass,
        Err(report) => return Ok(report),
    };
    let mut report = check_inner(dev, repair, true)?;
    crate::features::check_snapshots::finish(dev, repair, pass, &mut report)?;
    Ok(report)
}

/// Counts every reference in the image (qemu's `calculate_refcounts`).
fn count(dev: &Qcow2Device, m: &mut Meta, fix: bool) -> Result<(Counter, Vec<u64>)> {
    let cs = m.cs();
    let file_len = dev.file.len()?;
    let refs = m
        .limits()
        .alloc_elems::<u64>("check reference table", file_len.div_ceil(cs), 8)?;
    let mut cnt = Counter {
        refs,
        cs,
        file_len,
        max: m.max_refcount(),
        notes: Notes {
            report: CheckReport {
                allocated_clusters: Some(0),
                total_clusters: Some(m.h().size.div_ceil(cs)),
                fragmented_clusters: Some(0),
                compressed_clusters: Some(0),
                ..CheckReport::default()
            },
            dropped: 0,
        },
        fix,
        rewrote: false,
        rebuild: false,
        unreadable: 0,
    };
    cnt.inc(0, cs);
    let h = m.h().clone();
    let l1 = m.read_table("L1 table", h.l1_table_offset, u64::from(h.l1_size))?;
    cnt.inc(h.l1_table_offset, u64::from(h.l1_size) * 8);
    walk_l1(m, &mut cnt, &l1, true);
    for s in &m.snapshots().to_vec() {
        count_snapshot(m, &mut cnt, s);
    }
    if h.nb_snapshots > 0 {
        cnt.inc(h.snapshots_offset, m.snapshot_table_len());
    }
    cnt.inc(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
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
    count_refblocks(m, &mut cnt);
    Ok((cnt, l1))
}

/// Counts the refcount blocks, last, as qemu's `check_refblocks`, with its findings: a
/// table entry with reserved bits or a misaligned block (not counted; `-r all`
/// rebuilds), a block outside the file (`-r all` grows the file over it as qemu, see
/// [`grow_over`]),
/// a block something else also uses (its count is then above 1; `-r all` rebuilds).
fn count_refblocks(m: &Meta, cnt: &mut Counter) {
    let cs = cnt.cs;
    let mut clusters = cnt.file_len.div_ceil(cs);
    for (i, e) in m.reftable_entries() {
        let off = e & REFT_OFFSET_MASK;
        if e & REFT_RESERVED != 0 {
            cnt.notes.say(format_args!(
                "ERROR refcount table entry {i} has reserved bits set"
            ));
            cnt.notes.report.corruptions += 1;
            cnt.rebuild = true;
            continue;
        }
        if !off.is_multiple_of(cs) {
            cnt.notes.say(format_args!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            cnt.notes.report.corruptions += 1;
            cnt.rebuild = true;
            continue;
        }
        if off / cs >= clusters {
            let word = if cnt.fix { "Repairing" } else { "ERROR" };
            cnt.notes
                .say(format_args!("{word} refcount block {i} is outside image"));
            if cnt.fix && grow_over(m, cnt, off) {
                // No check of its count: it was just allocated, zeroed (as qemu).
                clusters = cnt.file_len.div_ceil(cs);
                cnt.notes.report.corruptions_fixed += 1;
                cnt.inc(off, cs);
                continue;
            }
            cnt.notes.report.corruptions += 1;
            cnt.rebuild |= cnt.fix;
            continue;
        }
        cnt.inc(off, cs);
        let n = usize::try_from(off / cs)
            .ok()
            .and_then(|c| cnt.refs.get(c))
            .copied();
        if let Some(n) = n.filter(|&n| n != 1) {
            cnt.notes
                .say(format_args!("ERROR refcount block {i} refcount={n}"));
            cnt.notes.report.corruptions += 1;
            cnt.rebuild = true;
        }
    }
}

/// qemu's repair of a refcount block outside the file (`check_refblocks`): the file
/// grows over it, so that it reads as an empty block, to be counted. Only while the
/// counters of the grown file stay within the metadata limit, as any table read from a
/// file that long would; otherwise (`false`) the rebuild drops the block instead.
fn grow_over(m: &Meta, cnt: &mut Counter, off: u64) -> bool {
    let cs = cnt.cs;
    let Some(len) = off.checked_add(cs) else {
        return false;
    };
    let n = len.div_ceil(cs);
    let limit = m
        .limits()
        .check("check reference table", n.saturating_mul(8));
    let Ok(n) = usize::try_from(n) else {
        return false;
    };
    if limit.is_err() || m.file().set_len(len).is_err() {
        return false;
    }
    cnt.file_len = len;
    cnt.refs.resize(n.max(cnt.refs.len()), 0);
    true
}

/// Rebuilds the refcount structures from the counted references, then checks again
/// (freeing the old structures as leaks), merging both reports as qemu does.
fn rebuild_and_recheck(
    dev: &Qcow2Device,
    mut m: crate::device::MetaGuard<'_>,
    cnt: Counter,
) -> Result<CheckReport> {
    let unreadable = cnt.unreadable;
    let old = cnt.notes.finish();
    let mut refs = cnt.refs;
    crate::engine::rebuild::rebuild(&mut m, &mut refs)?;
    drop(m);
    let fresh = check_inner(dev, RepairMode::All, false)?;
    let mut messages = old.messages;
    messages.push("Rebuilding refcount structure".into());
    messages.extend(
        fresh
            .messages
            .iter()
            // Its first comparison pass; the repairing pass says it again.
            .filter(|s| !s.starts_with("Leaked cluster"))
            .cloned(),
    );
    Ok(CheckReport {
        corruptions: old.corruptions + fresh.corruptions,
        leaks: old.leaks,
        // As qemu: the rebuild fixed what the recheck no longer finds (an entry it
        // cannot repair, such as an unaligned data cluster, is still counted).
        corruptions_fixed: old.corruptions_fixed
            + old
                .corruptions
                .saturating_sub(fresh.corruptions.saturating_sub(fresh.corruptions_fixed))
            + fresh.corruptions_fixed,
        leaks_fixed: old.leaks,
        // Refcounts that could not be read were replaced by the rebuild: unlike qemu's
        // (whose rebuild fails after the corruption event), the repair succeeded.
        check_errors: old.check_errors.saturating_sub(unreadable) + fresh.check_errors,
        messages,
        ..fresh
    })
}

fn check_inner(dev: &Qcow2Device, repair: RepairMode, may_rebuild: bool) -> Result<CheckReport> {
    let mut m = dev.lock();
    if !dev.read_only {
        m.commit_deferred()?;
    }
    let cs = m.cs();
    let fix = repair == RepairMode::All && !dev.read_only;
    let (mut cnt, l1) = count(dev, &mut m, fix)?;
    if cnt.rewrote {
        m.reset_l2_cache();
    }
    let (mismatches, highest) = compare(&mut m, &mut cnt, repair, !dev.read_only);
    let needs_rebuild = cnt.rebuild || mismatches.iter().any(|x| x.have == 0);
    // A referenced cluster with refcount 0 needs the refcount structures rebuilt, which
    // only `-r all` may do: qemu refuses `-r leaks` then (check error, EIO).
    if repair == RepairMode::Leaks && needs_rebuild {
        cnt.notes
            .say(format_args!("ERROR need to rebuild refcount structures"));
        cnt.notes.report.check_errors += 1;
        return Ok(cnt.notes.finish());
    }
    // As qemu: a referenced cluster with refcount 0 means the refcount structures are
    // rebuilt from the counted references, then the old ones are freed as leaks.
    if repair == RepairMode::All && may_rebuild && needs_rebuild {
        return rebuild_and_recheck(dev, m, cnt);
    }
    let mut notes = cnt.notes;
    if repair != RepairMode::None && !mismatches.is_empty() {
        fix_mismatches(&mut m, &mut notes, repair, &mismatches);
    }
    let fix_flags = may_repair(repair, &notes);
    let l1_offset = m.h().l1_table_offset;
    if check_copied(dev, &mut m, &mut notes, &l1, l1_offset, fix_flags)? {
        // Reload what the caches hold of the rewritten tables.
        m.reset_l2_cache();
        let n = u64::from(m.h().l1_size);
        m.load_l1("L1 table", l1_offset, n)?;
    }
    if repair != RepairMode::None {
        dev.file.flush()?;
    }
    notes.report.image_end_offset = Some((highest + 1) * cs);
    let r = &notes.report;
    if repair != RepairMode::None && r.check_errors == 0 && r.corruptions == r.corruptions_fixed {
        // As qemu after a successful repair: the image is clean and consistent again.
        let cleared = m.h().incompatible & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        if cleared != m.h().incompatible {
            m.write_incompatible(cleared)?;
        }
    }
    // As qemu-img's ImageCheck: statistics that are zero are absent.
    let r = &mut notes.report;
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
    Ok(notes.finish())
}
