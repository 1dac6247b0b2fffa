//! Persistent dirty bitmaps held in memory while an image is open read-write (spec
//! "Bitmaps extension"; qemu `qcow2_load_dirty_bitmaps` and
//! `qcow2_store_persistent_dirty_bitmaps`), with qemu's order of allocations so that a
//! full file fails where qemu's does.
//!
//! On a read-write open every bitmap that is not `in_use` is read into memory (enabled
//! and disabled ones) and marked `in_use` in the directory in place (nothing is
//! allocated). Every guest write, write-zeroes and discard sets the bits covering its
//! range in the enabled ones. On close every bitmap held is written anew, in directory
//! order and then the new ones (newest first, as qemu's list): for each its data
//! clusters, then its table; then a new directory without `in_use` replaces the old one,
//! and only then are the old tables and data clusters freed. When a store fails, the
//! clusters written for it are freed again and the directory is left as it is (the
//! bitmaps stay `in_use`, inconsistent, as qemu leaves them). A crash at any point
//! leaves the old or the new directory, at worst with leaked clusters.
//!
//! Bitmaps already `in_use` on open are inconsistent: left alone, never stored (as qemu).

use diskimg_blockio::{BlockDevice, Error, Result};

use crate::device::Qcow2Device;
use crate::engine::meta::Meta;
use crate::features::bitmap::{
    Entry, free_all, load_tracked, read_directory, table_clusters, write_bits, write_directory,
    write_directory_in_place, write_failed,
};
use crate::tracked::Tracked;

/// Flag bit 0: `in_use`.
pub(crate) const IN_USE: u32 = 1;
/// Flag bit 1: `auto` (enabled).
pub(crate) const AUTO: u32 = 2;

/// Reads every bitmap that is not `in_use` and marks it `in_use` on disk (the
/// directory rewritten in place). Returns the bitmaps now held.
pub(crate) fn load(m: &mut Meta) -> Result<Vec<Tracked>> {
    let mut dir = read_directory(m)?;
    let mut out = Vec::new();
    for e in dir.iter_mut() {
        if e.flags & IN_USE != 0 {
            continue;
        }
        out.push(load_tracked(m, e)?);
        e.flags |= IN_USE;
    }
    if !out.is_empty() {
        m.commit_deferred()?;
        write_directory_in_place(m, &dir)?;
    }
    Ok(out)
}

/// Before a resize to `new` bytes: refuses if a bitmap is inconsistent (`in_use` and
/// not ours), as qemu's `qcow2_truncate_bitmaps_check`; loads any bitmap not held yet
/// and marks it `in_use` (an `in_use` bitmap may have a table of the wrong size).
/// Once the size has changed, [`Tracked::truncate`] resizes them in memory; they are
/// written back on close.
pub(crate) fn prepare_resize(m: &mut Meta, tracked: &mut Vec<Tracked>, new: u64) -> Result<()> {
    let mut dir = read_directory(m)?;
    let mut changed = false;
    for e in dir.iter_mut() {
        if tracked.iter().any(|t| t.name == e.name) {
            continue;
        }
        if e.flags & IN_USE != 0 {
            return Err(Error::invalid(format!(
                "Bitmap '{}' is inconsistent and cannot be used\n\
                 Try block-dirty-bitmap-remove to delete this bitmap from disk",
                e.name
            )));
        }
        tracked.push(load_tracked(m, e)?);
        e.flags |= IN_USE;
        changed = true;
    }
    if changed {
        m.commit_deferred()?;
        write_directory_in_place(m, &dir)?;
    }
    // The bits are held sparsely; their tables are not.
    for t in tracked.iter() {
        let bytes = new.div_ceil(t.granularity.max(1)).div_ceil(8);
        m.limits()
            .check("bitmap table", bytes.div_ceil(m.cs()) * 8)?;
    }
    Ok(())
}

/// Writes the held bitmaps back (see the module docs for the order), clears their
/// `in_use` flag and frees their old tables and data clusters. On failure the clusters
/// written by this call are freed and the directory is unchanged.
pub(crate) fn store(m: &mut Meta, tracked: &[Tracked]) -> Result<()> {
    if tracked.is_empty() {
        return Ok(());
    }
    m.commit_deferred()?;
    m.file().flush()?;
    let mut dir = read_directory(m)?;
    let (mut written, mut old) = (Vec::new(), Vec::new());
    if let Err(e) = store_all(m, &mut dir, tracked, &mut written, &mut old) {
        free_all(m, &written);
        let _ = m.file().flush();
        return Err(e);
    }
    for (o, l) in old {
        m.unref_range(o, l)?;
    }
    m.file().flush()
}

/// [`store`]'s writes: the bitmaps' new clusters (recorded in `written`), the new
/// directory; `old` gets the clusters to free once it is in place.
fn store_all(
    m: &mut Meta,
    dir: &mut Vec<Entry>,
    tracked: &[Tracked],
    written: &mut Vec<(u64, u64)>,
    old: &mut Vec<(u64, u64)>,
) -> Result<()> {
    let size = m.size();
    // qemu's list: the directory's bitmaps in order, then the new ones newest first.
    let mut order: Vec<(Option<usize>, &Tracked)> = Vec::new();
    for (i, e) in dir.iter().enumerate() {
        if let Some(t) = tracked.iter().find(|t| t.name == e.name) {
            order.push((Some(i), t));
        }
    }
    for t in tracked.iter().rev() {
        if !dir.iter().any(|e| e.name == t.name) {
            order.push((None, t));
        }
    }
    for (slot, t) in order {
        let mut t = t.clone();
        t.truncate(size);
        let w = write_bits(m, &t).map_err(|e| write_failed(&t.name, e))?;
        written.extend_from_slice(&w.clusters);
        let flags = if t.enabled { AUTO } else { 0 };
        match slot.and_then(|i| dir.get_mut(i)) {
            Some(e) => {
                old.extend(table_clusters(m, e)?);
                e.table_offset = w.table;
                e.table_size = w.entries;
                e.flags = flags;
            }
            None => {
                let gbits = u8::try_from(t.granularity.trailing_zeros()).unwrap_or(16);
                dir.push(Entry::new(&t.name, gbits, flags, w.table, w.entries));
            }
        }
    }
    write_directory(m, dir).map_err(|e| match e {
        Error::Io { source, .. } => Error::io("Failed to update bitmap extension", source),
        e => e,
    })?;
    m.file().flush()
}

impl Qcow2Device {
    /// Flushes and writes the persistent dirty bitmaps back (clearing their `in_use`
    /// flag), as closing the image in qemu does; dropping the device does the same but
    /// ignores errors. Writes are refused afterwards (no bitmap would see them); a
    /// second call does nothing.
    pub fn close(&self) -> Result<()> {
        if !self.closed.close() || self.read_only || self.lock().corruption_signalled() {
            return Ok(());
        }
        self.flush()?;
        if let Some(e) = self.lock().overlap_close_error() {
            return Err(e);
        }
        // The clusters allocated ahead go back: a closed image has no leaks.
        if self.lock().release_reserve()? {
            self.file.flush()?;
        }
        let tracked = std::mem::take(&mut *self.tracked.lock().unwrap_or_else(|e| e.into_inner()));
        store(&mut self.lock(), &tracked)?;
        // Lazy refcounts: the held refcounts go out and the dirty bit is cleared.
        self.lock().lazy_clean()
    }

    /// Sets the bits covering `off..off+len` in every bitmap that tracks writes.
    pub(crate) fn mark_dirty(&self, off: u64, len: u64) {
        let mut t = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        for b in t.iter_mut().filter(|b| b.enabled) {
            b.mark(off, len);
        }
    }
}
