//! Progress of `qemu-img amend -p`, reported as qemu's qcow2 driver reports it: each
//! operation (upgrade, refcount width change, downgrade) calls back with its own
//! `(done, total)` work units and [`Progress`] (qemu's `qcow2_amend_helper_cb`) scales
//! them into one range over all operations, projecting the work of those still to come.
//!
//! The work units are qemu's: the upgrade counts 0, 1, 2 of 2; the downgrade one unit per
//! L1 entry visited (active table, then each snapshot's); the refcount width change one
//! unit per refcount-table entry and walk, where the number of walks is that of qemu's
//! `qcow2_change_refcount_order` ([`refcount_walks`]: allocation walks until a walk
//! allocates nothing new, plus the writing walk). The percentages are therefore qemu's,
//! including the step back when a walk more than planned is needed.

use std::collections::BTreeSet;

/// One amend operation (qemu's `Qcow2AmendOperation`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Upgrading,
    ChangingRefcountOrder,
    Downgrading,
}

/// qemu's `Qcow2AmendHelperCBInfo` around the caller's callback.
pub(crate) struct Progress<'a> {
    cb: &'a mut dyn FnMut(u64, u64),
    total_ops: u64,
    ops_done: u64,
    last_op: Option<Op>,
    offset_done: u64,
    last_work: u64,
}

impl<'a> Progress<'a> {
    /// Progress over `total_ops` operations, reported to `cb(done, total)`.
    pub(crate) fn new(cb: &'a mut dyn FnMut(u64, u64), total_ops: u64) -> Self {
        Self {
            cb,
            total_ops,
            ops_done: 0,
            last_op: None,
            offset_done: 0,
            last_work: 0,
        }
    }

    /// Operation `op` has done `offset` of `work` units.
    pub(crate) fn report(&mut self, op: Op, offset: u64, work: u64) {
        if self.last_op != Some(op) {
            if self.last_op.is_some() {
                self.offset_done = self.offset_done.saturating_add(self.last_work);
                self.ops_done += 1;
            }
            self.last_op = Some(op);
        }
        if self.total_ops == 0 || self.ops_done >= self.total_ops {
            return;
        }
        self.last_work = work;
        let current = self.offset_done.saturating_add(work);
        let projected =
            current.saturating_mul(self.total_ops - self.ops_done - 1) / (self.ops_done + 1);
        (self.cb)(
            self.offset_done.saturating_add(offset),
            current.saturating_add(projected),
        );
    }

    /// The upgrade's three reports.
    pub(crate) fn upgrade(&mut self) {
        for k in 0..=2 {
            self.report(Op::Upgrading, k, 2);
        }
    }

    /// The downgrade's reports: one per L1 entry of all `l1_entries`.
    pub(crate) fn downgrade(&mut self, l1_entries: u64) {
        for k in 1..=l1_entries {
            self.report(Op::Downgrading, k, l1_entries);
        }
    }

    /// The refcount width change's reports: `walks` walks over `reftable` entries each.
    pub(crate) fn refcount_walks(&mut self, walks: u64, reftable: u64) {
        let op = Op::ChangingRefcountOrder;
        for w in 0..walks {
            // Allocation walks plan on at least three walks in all; the last one, which
            // writes the blocks, knows the real count.
            let total = if w + 1 == walks {
                walks
            } else {
                (w + 2).max(3)
            };
            for i in 0..reftable {
                self.report(op, w * reftable + i, total * reftable);
            }
            self.report(op, (w + 1) * reftable, total * reftable);
        }
    }
}

/// The refcount structures a width change starts from.
pub(crate) struct Widths {
    /// Cluster size.
    pub(crate) cs: u64,
    /// Entries of the current refcount table.
    pub(crate) reftable: u64,
    /// Current and new refcount widths (bits).
    pub(crate) old_bits: u64,
    pub(crate) new_bits: u64,
}

/// How many walks qemu's `qcow2_change_refcount_order` makes over the refcount table
/// for the image whose refcounts (index = host cluster) are `refs`: walks that allocate
/// the new refcount blocks (first fit, one cluster each, counted in the old structures
/// at once, so a block landing in a range the walk has passed is found by the next
/// walk) and a new refcount table after each walk that allocated, until a walk
/// allocates nothing, then the walk that writes the blocks.
pub(crate) fn refcount_walks(refs: &[u64], w: &Widths) -> u64 {
    let bits_per_cluster = w.cs.saturating_mul(8);
    let old_rbe = (bits_per_cluster / w.old_bits.max(1)).max(1);
    let new_rbe = (bits_per_cluster / w.new_bits.max(1)).max(1);
    let per_table_cluster = (w.cs / 8).max(1);
    let covered = w.reftable.saturating_mul(old_rbe);
    let mut refs = refs.to_vec();
    let mut hint = 0usize;
    let mut blocks: Vec<u64> = Vec::new();
    let mut table: Option<(usize, usize)> = None;
    for walks in 1..=64u64 {
        let mut live: BTreeSet<u64> = refs
            .iter()
            .enumerate()
            .filter(|&(c, &r)| r != 0 && (c as u64) < covered)
            .map(|(c, _)| c as u64 / new_rbe)
            .collect();
        let mut allocated = false;
        let mut from = 0u64;
        while let Some(&j) = live.range(from..).next() {
            from = j + 1;
            let ji = usize::try_from(j).unwrap_or(usize::MAX);
            if ji >= blocks.len() {
                let want = (j + 1).next_multiple_of(per_table_cluster);
                blocks.resize(usize::try_from(want).unwrap_or(ji + 1), 0);
            }
            if blocks.get(ji).copied() == Some(0) {
                let a = first_fit(&mut refs, &mut hint, 1);
                if let Some(b) = blocks.get_mut(ji) {
                    *b = a as u64 + 1;
                }
                allocated = true;
                let ja = a as u64 / new_rbe;
                if ja > j && (a as u64) < covered {
                    live.insert(ja);
                }
            }
        }
        if !allocated {
            return walks + 1;
        }
        if let Some((t, n)) = table.take() {
            for c in refs.iter_mut().skip(t).take(n) {
                *c = 0;
            }
            hint = hint.min(t);
        }
        let n = (blocks.len() as u64 * 8).div_ceil(w.cs.max(1));
        let n = usize::try_from(n).unwrap_or(1).max(1);
        table = Some((first_fit(&mut refs, &mut hint, n), n));
    }
    3
}

/// qemu's `alloc_clusters_noref` + refcount 1: the first `n` free clusters in a row
/// from `hint`, which moves past them.
fn first_fit(refs: &mut Vec<u64>, hint: &mut usize, n: usize) -> usize {
    let mut start = *hint;
    while let Some(used) = (start..start + n).find(|&c| refs.get(c).is_some_and(|&r| r != 0)) {
        start = used + 1;
    }
    if refs.len() < start + n {
        refs.resize(start + n, 0);
    }
    for r in refs.iter_mut().skip(start).take(n) {
        *r = 1;
    }
    *hint = start + n;
    start
}

#[cfg(test)]
mod tests {
    use super::*;

    /// iotest 112's "multiple walks" image: 512-byte clusters, refcount_bits=1 → 64, 63
    /// used clusters: the first new block holds its own count, the new table needs a
    /// second block, so qemu walks four times.
    #[test]
    fn walks_as_qemu() {
        let w = Widths {
            cs: 512,
            reftable: 64,
            old_bits: 1,
            new_bits: 64,
        };
        assert_eq!(refcount_walks(&[1; 63], &w), 4);
        assert_eq!(refcount_walks(&[1; 10], &w), 3);
        let w16 = Widths {
            cs: 65536,
            reftable: 8192,
            old_bits: 16,
            new_bits: 64,
        };
        assert_eq!(refcount_walks(&[1; 5], &w16), 3);
    }

    #[test]
    fn projection_over_operations() {
        let mut seen = Vec::new();
        let mut cb = |d: u64, t: u64| seen.push((d, t));
        let mut p = Progress::new(&mut cb, 2);
        p.upgrade();
        p.downgrade(4);
        assert_eq!(
            seen,
            vec![(0, 4), (1, 4), (2, 4), (3, 6), (4, 6), (5, 6), (6, 6)]
        );
    }
}
