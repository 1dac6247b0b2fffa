//! Persistent dirty bitmaps kept up to date by guest writes while an image is open
//! read-write (spec "Bitmaps extension"; qemu `qcow2_load_dirty_bitmaps` and
//! `qcow2_store_persistent_dirty_bitmaps`).
//!
//! On a read-write open every enabled (`auto`) bitmap that is not `in_use` is read into
//! memory and marked `in_use` in a new bitmap directory before the first guest write.
//! Every guest write, write-zeroes and discard sets the bits covering its range. On close
//! the bits go to new bitmap tables and data clusters, a new directory without `in_use`
//! replaces the old one, and only then are the old tables and data clusters freed.
//! A crash in between leaves the bitmaps `in_use` (inconsistent, as qemu leaves them) and
//! at worst leaked clusters.
//!
//! Differences from qemu: disabled bitmaps are not loaded, marked or rewritten (nothing
//! changes them); qemu rewrites them unchanged at new offsets. Bitmaps already `in_use`
//! on open are left alone, as qemu does (it loads them as inconsistent and never stores
//! them).

use diskimg_blockio::{BlockDevice, Error, Result};

use crate::device::Qcow2Device;
use crate::engine::meta::Meta;
use crate::features::bitmap::{
    read_bits, read_directory, table_clusters, write_bits, write_directory,
};
use crate::tracked::Tracked;

/// Flag bit 0: `in_use`.
const IN_USE: u32 = 1;
/// Flag bit 1: `auto` (enabled).
const AUTO: u32 = 2;

/// Reads every enabled bitmap that is not `in_use` and marks it `in_use` on disk
/// (new directory, header switched to it). Returns the bitmaps now tracked.
pub(crate) fn load(m: &mut Meta) -> Result<Vec<Tracked>> {
    let mut dir = read_directory(m)?;
    let mut out = Vec::new();
    for e in dir.iter_mut() {
        if e.flags & AUTO == 0 || e.flags & IN_USE != 0 {
            continue;
        }
        let bits = read_bits(m, e)?;
        out.push(Tracked {
            name: e.name.clone(),
            granularity: 1u64 << e.gbits.min(63),
            bits,
            enabled: true,
        });
        e.flags |= IN_USE;
    }
    if !out.is_empty() {
        m.commit_deferred()?;
        write_directory(m, &dir)?;
        m.file().flush()?;
    }
    Ok(out)
}

/// Before a resize to `new` bytes: refuses if a bitmap is inconsistent (`in_use` and
/// not ours), as qemu's `qcow2_truncate_bitmaps_check`; loads the disabled bitmaps too
/// and marks them `in_use` (an `in_use` bitmap may have a table of the wrong size).
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
        let bits = read_bits(m, e)?;
        tracked.push(Tracked {
            name: e.name.clone(),
            granularity: 1u64 << e.gbits.min(63),
            bits,
            enabled: e.flags & AUTO != 0,
        });
        e.flags |= IN_USE;
        changed = true;
    }
    if changed {
        m.commit_deferred()?;
        write_directory(m, &dir)?;
        m.file().flush()?;
    }
    for t in tracked.iter() {
        m.limits().check(
            "bitmap data",
            new.div_ceil(t.granularity.max(1)).div_ceil(8),
        )?;
    }
    Ok(())
}

/// Writes the tracked bitmaps back (new tables and data), clears their `in_use` flag
/// and frees their old tables and data clusters.
pub(crate) fn store(m: &mut Meta, tracked: &[Tracked]) -> Result<()> {
    if tracked.is_empty() {
        return Ok(());
    }
    m.commit_deferred()?;
    m.file().flush()?;
    let mut dir = read_directory(m)?;
    let mut free = Vec::new();
    let size = m.size();
    for t in tracked {
        let mut t = t.clone();
        t.truncate(size);
        let e = dir
            .iter_mut()
            .find(|e| e.name == t.name)
            .ok_or(crate::errors::internal("tracked bitmap left the directory"))?;
        let old = e.clone();
        let (table, size) = write_bits(m, &t.bits)?;
        free.extend(table_clusters(m, &old)?);
        e.table_offset = table;
        e.table_size = size;
        e.flags &= !IN_USE;
    }
    write_directory(m, &dir)?;
    m.file().flush()?;
    for (o, l) in free {
        m.unref_range(o, l)?;
    }
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
