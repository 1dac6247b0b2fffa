//! Deferred metadata updates ([`Deferred`]): L2 entries applied in the cache but not yet
//! written ([`L2Update`]), the host ranges that lose a reference once those are durable,
//! and whether a storage flush must come before they are written (they point to new
//! clusters). [`Meta::defer`](crate::engine::meta::Meta::defer) fills it,
//! `Meta::write_deferred` empties it.

use std::collections::BTreeMap;

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
        self.updates.extend(updates);
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

    /// Number of queued L2 updates.
    pub(crate) fn len(&self) -> usize {
        self.updates.len()
    }

    /// Nothing queued at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.updates.is_empty() && self.unref.is_empty() && self.punch.is_empty()
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
        std::mem::take(&mut self.unref)
    }
}
