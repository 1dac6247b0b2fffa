//! Deferred metadata updates ([`Deferred`]): L2 entries applied in the cache but not yet
//! written ([`L2Update`]), new L2 tables whose L1 entries are not yet written (with
//! deferred tables, see `Meta::set_deferred_tables`), the host ranges that lose a
//! reference once those are durable, and whether a storage flush must come before they
//! are written (they point to new clusters). [`Meta::defer`](crate::engine::meta::Meta::defer)
//! and `Meta::new_l2_deferred` fill it, `Meta::write_deferred` empties it.

use std::collections::BTreeMap;

use diskimg_blockio::{DebugEvent, Error, Result};

use crate::disk::table::{OFLAG_COPIED, encode_u64s};
use crate::engine::meta::Meta;
use crate::errors::internal;

/// One L2 entry update, applied to the cache at once and written later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct L2Update {
    /// Host offset of the L2 table.
    pub(crate) table: u64,
    /// Entry index in the table.
    pub(crate) index: u64,
    /// The new entry (spec "Cluster mapping", L2 entry bits).
    pub(crate) entry: u64,
    /// The new subcluster allocation bitmap (extended L2 only).
    pub(crate) bitmap: u64,
}

impl L2Update {
    /// Entry `index` of the table at `table` becomes `entry` (with `bitmap`).
    pub(crate) const fn new(table: u64, index: u64, entry: u64, bitmap: u64) -> Self {
        Self {
            table,
            index,
            entry,
            bitmap,
        }
    }
}

/// Updates waiting for the next write of deferred metadata (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Deferred {
    updates: Vec<L2Update>,
    /// New L2 tables: (L1 index, table offset). Cached, written whole, and pointed to by
    /// their L1 entries only after the flush that makes them durable.
    tables: Vec<(u64, u64)>,
    unref: Vec<(u64, u64)>,
    /// Host ranges to punch once their clusters are free (see `engine::punch`).
    punch: Vec<(u64, u64)>,
    flush: bool,
}

impl Deferred {
    /// Queues `updates` and `unref`; `new_clusters`: they point to new clusters.
    pub(crate) fn add(
        &mut self,
        updates: Vec<L2Update>,
        unref: Vec<(u64, u64)>,
        new_clusters: bool,
    ) {
        // A new table is written whole: its updates need no span of their own (so a
        // table being filled does not count towards the bound on pending updates).
        let tables = &self.tables;
        self.updates.extend(
            updates
                .into_iter()
                .filter(|u| tables.is_empty() || !tables.iter().any(|&(_, t)| t == u.table)),
        );
        self.unref.extend(unref);
        self.flush |= new_clusters;
    }

    /// Queues host ranges to punch once their clusters are free (after the updates).
    pub(crate) fn add_punch(&mut self, ranges: &[(u64, u64)]) {
        self.punch.extend_from_slice(ranges);
    }

    /// Takes the ranges queued by [`Deferred::add_punch`].
    pub(crate) fn take_punch(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.punch)
    }

    /// Queues the new L2 table at `table` for L1 index `l1i` (a flush must come before
    /// its L1 entry is written).
    pub(crate) fn add_table(&mut self, l1i: u64, table: u64) {
        self.tables.push((l1i, table));
        self.flush = true;
    }

    /// The queued new tables: (L1 index, table offset), in allocation order.
    pub(crate) fn tables(&self) -> &[(u64, u64)] {
        &self.tables
    }

    /// Number of queued L2 updates.
    pub(crate) fn len(&self) -> usize {
        self.updates.len()
    }

    /// Nothing queued at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.updates.is_empty()
            && self.unref.is_empty()
            && self.tables.is_empty()
            && self.punch.is_empty()
    }

    /// Whether a storage flush must come before the updates are written.
    pub(crate) fn needs_flush(&self) -> bool {
        self.flush
    }

    /// Takes the queued L2 updates as the span of indexes each table needs written:
    /// table offset → (lowest, highest index).
    pub(crate) fn take_spans(&mut self) -> BTreeMap<u64, (u64, u64)> {
        let mut spans: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for u in std::mem::take(&mut self.updates) {
            let s = spans.entry(u.table).or_insert((u.index, u.index));
            *s = (s.0.min(u.index), s.1.max(u.index));
        }
        spans
    }

    /// The updates are written: no flush is owed any more; returns the ranges to
    /// unreference.
    pub(crate) fn written(&mut self) -> Vec<(u64, u64)> {
        self.flush = false;
        self.tables.clear();
        std::mem::take(&mut self.unref)
    }
}

impl Meta {
    /// Writes the deferred L2 updates (see [`Meta::defer`]) and the new L2 tables with
    /// their L1 entries (see [`Meta::set_deferred_tables`]).
    pub(crate) fn write_deferred(&mut self) -> Result<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        // New tables first, whole: no L1 entry on disk points to them yet, so what they
        // hold need not be durable before they are written; the flush below makes them
        // (and the data and refcounts they point to) durable before their L1 entries.
        let tables = self.deferred.tables().to_vec();
        for &(_, t) in &tables {
            let raw = encode_u64s(self.l2_table(t)?);
            self.file.debug_event(DebugEvent::L2AllocWrite);
            self.file.write_all_at(&raw, t)?;
        }
        // Reserved clusters whose refcounts no flush covered yet (see `reserve`) count
        // as new clusters here.
        if self.deferred.needs_flush() || self.reserve_owes_flush() {
            if let Some(d) = &self.data {
                d.flush()?;
            }
            self.file.flush()?;
            self.reserve_flushed_now();
        }
        self.write_l1_entries(tables.iter().map(|&(i, _)| i))?;
        // The cached tables hold every deferred update (and equal the disk elsewhere):
        // each table goes out as one write of the span its updates cover, whatever order
        // the guest wrote in (the updates become durable together at the next flush).
        let spans = self.deferred.take_spans();
        for (t, (lo, hi)) in spans {
            if !tables.iter().any(|&(_, n)| n == t) {
                self.write_l2_span(t, lo, hi)?;
            }
        }
        self.l2.dirty.clear();
        let unref = self.deferred.written();
        if !unref.is_empty() {
            self.file.flush()?;
            for (o, l) in unref {
                self.unref_range(o, l)?;
            }
        }
        let punch = self.deferred.take_punch();
        if !punch.is_empty() {
            self.punch_freed(punch);
        }
        Ok(())
    }

    /// Writes entries `lo..=hi` of the cached L2 table at `l2_off` with one storage write.
    fn write_l2_span(&mut self, l2_off: u64, lo: u64, hi: u64) -> Result<()> {
        let per = if self.h.extended_l2() { 2 } else { 1 };
        let t = self.l2_table(l2_off)?;
        let range = usize::try_from(lo * per)
            .ok()
            .zip(usize::try_from((hi + 1) * per).ok());
        let span = range.and_then(|(a, b)| t.get(a..b)).ok_or(Error::corrupt(
            "qcow2",
            "L2 index out of range",
            l2_off,
        ))?;
        let raw = encode_u64s(span);
        self.file.debug_event(DebugEvent::L2Update);
        self.file.write_all_at(&raw, l2_off + lo * per * 8)
    }

    /// With `on`, a new L2 table for an empty L1 entry (see `write::ensure_l2`) is not
    /// written and flushed before its L1 entry at once: it waits in the cache (its L1
    /// entry set in memory only) for the next write of deferred updates, which writes
    /// every new table whole, flushes once, then writes their L1 entries. A crash before
    /// then leaks the tables and the clusters they point to, and corrupts nothing. Off
    /// (qemu's order: table, flush, L1 entry, per table) unless asked for
    /// (`x-deferred-tables=on`, see `Qcow2OpenOptions::deferred_tables`).
    pub(crate) fn set_deferred_tables(&mut self, on: bool) {
        self.deferred_tables = on;
    }

    /// Whether new L2 tables are deferred (see [`Meta::set_deferred_tables`]).
    pub(crate) fn deferred_tables(&self) -> bool {
        self.deferred_tables
    }

    /// A new L2 table `table` at `off` for L1 index `l1i`, deferred (see
    /// [`Meta::set_deferred_tables`]): cached, and the L1 entry set in memory.
    pub(crate) fn new_l2_deferred(&mut self, l1i: u64, off: u64, table: Vec<u64>) -> Result<()> {
        let k = usize::try_from(l1i).map_err(|_| internal("L1 index"))?;
        let slot =
            self.l1
                .get_mut(k)
                .ok_or(Error::corrupt("qcow2", "L1 index out of range", l1i))?;
        *slot = off | OFLAG_COPIED;
        self.l2.insert(off, table);
        self.l2.dirty.insert(off);
        self.deferred.add_table(l1i, off);
        Ok(())
    }

    /// Writes the deferred new L2 tables and their L1 entries now (before the L1 table is
    /// copied elsewhere).
    pub(crate) fn write_new_tables(&mut self) -> Result<()> {
        if self.deferred.tables().is_empty() {
            return Ok(());
        }
        self.write_deferred()
    }

    /// Writes the L1 entries `indices` (from memory), one write per run of neighbours.
    fn write_l1_entries(&mut self, indices: impl Iterator<Item = u64>) -> Result<()> {
        let mut idx: Vec<u64> = indices.collect();
        idx.sort_unstable();
        idx.dedup();
        let mut k = 0;
        while let Some(&lo) = idx.get(k) {
            let mut hi = lo;
            while idx.get(k + 1) == Some(&(hi + 1)) {
                hi += 1;
                k += 1;
            }
            k += 1;
            let range = usize::try_from(lo).ok().zip(usize::try_from(hi + 1).ok());
            let span = range
                .and_then(|(a, b)| self.l1.get(a..b))
                .ok_or(Error::corrupt("qcow2", "L1 index out of range", lo))?;
            let raw = encode_u64s(span);
            self.file.debug_event(DebugEvent::L1Update);
            self.file.write_all_at(&raw, self.l1_offset + lo * 8)?;
        }
        Ok(())
    }
}
