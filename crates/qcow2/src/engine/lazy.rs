//! Lazy refcounts (spec: compatible feature bit 0 and incompatible feature bit 0,
//! "dirty"; qemu's `lazy_refcounts=on`, `qcow2_mark_dirty`, `qcow2_mark_clean`).
//!
//! With lazy refcounts on an image opened read-write, the first allocating guest write
//! sets the dirty bit (written and flushed before anything relies on it). From then on
//! refcount updates stay in the cached refcount blocks ("held"): guest flushes write
//! the L2 tables but not the refcounts, as qemu's `qcow2_write_caches` does while the
//! image is dirty. A clean close writes the held blocks, flushes, and clears the bit.
//!
//! Crash consistency: while the bit is on disk every opener ignores the on-disk
//! refcounts (a read-write open or `check -r` rebuilds them from the references), so
//! leaked or missing refcounts are allowed. Allocation decisions use the cached blocks,
//! which are always current, and the ordering of L2 updates before refcount decreases
//! is unchanged, so no reference ever dangles. Held blocks are written before the
//! cache drops them and before every metadata operation other than guest I/O
//! ([`Meta::commit_deferred`]). The reserve (see `reserve`) is not used: its purpose,
//! durable refcounts ahead of the next writes, is moot here.

use std::collections::HashSet;

use diskimg_blockio::{DebugEvent, Result};

use crate::disk::header::INCOMPAT_DIRTY;
use crate::engine::meta::Meta;

/// The lazy-refcount state of an open image.
#[derive(Debug, Default)]
pub(crate) struct Lazy {
    /// Lazy refcounts are in effect (read-write, version 3, bit or runtime option).
    on: bool,
    /// Offsets of cached refcount blocks newer than the disk.
    held: HashSet<u64>,
}

impl Meta {
    /// Turns lazy refcounts on or off for this open image. Turning them off writes the
    /// held refcounts and clears the dirty bit this image set.
    pub(crate) fn set_lazy_refcounts(&mut self, on: bool) -> Result<()> {
        if !on {
            self.lazy_clean()?;
        }
        self.lazy.on = on;
        Ok(())
    }

    /// Whether lazy refcounts are in effect.
    pub(crate) fn lazy_refcounts(&self) -> bool {
        self.lazy.on
    }

    /// Before an allocating guest write: with lazy refcounts, marks the image dirty
    /// (durably) if it is not yet.
    pub(crate) fn lazy_mark_dirty(&mut self) -> Result<()> {
        if self.lazy.on && self.h.incompatible & INCOMPAT_DIRTY == 0 {
            let bits = self.h.incompatible | INCOMPAT_DIRTY;
            self.write_incompatible(bits)?;
        }
        Ok(())
    }

    /// Whether refcount updates are held in the cache (lazy and dirty on disk).
    fn holds_refcounts(&self) -> bool {
        self.lazy.on && self.h.incompatible & INCOMPAT_DIRTY != 0
    }

    /// Writes `bytes` at byte `lo` of the refcount block at `off` (already updated in
    /// the cache), or holds the block while the image is dirty with lazy refcounts.
    pub(in crate::engine) fn put_refblock(
        &mut self,
        off: u64,
        lo: usize,
        bytes: &[u8],
    ) -> Result<()> {
        if self.holds_refcounts() && self.rb.contains_key(&off) {
            self.lazy.held.insert(off);
            return Ok(());
        }
        self.file.debug_event(DebugEvent::RefblockUpdatePart);
        self.file.write_all_at(bytes, off + lo as u64)
    }

    /// Writes every held refcount block (not flushed).
    pub(crate) fn write_held(&mut self) -> Result<()> {
        let held: Vec<u64> = self.lazy.held.drain().collect();
        for off in held {
            if let Some(b) = self.rb.get(&off) {
                self.file.debug_event(DebugEvent::RefblockUpdatePart);
                self.file.write_all_at(b, off)?;
            }
        }
        Ok(())
    }

    /// At a clean close: writes the held refcounts and, once they are durable, clears
    /// the dirty bit set by this image's writes.
    pub(crate) fn lazy_clean(&mut self) -> Result<()> {
        if !self.lazy.on || self.h.incompatible & INCOMPAT_DIRTY == 0 {
            return Ok(());
        }
        self.write_held()?;
        // write_incompatible flushes before (the refcounts) and after (the bit).
        let bits = self.h.incompatible & !INCOMPAT_DIRTY;
        self.write_incompatible(bits)
    }
}
