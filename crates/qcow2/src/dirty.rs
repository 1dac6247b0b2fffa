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

use crate::bitmap::{read_bits, read_directory, table_clusters, write_bits, write_directory};
use crate::device::Qcow2Device;
use crate::meta::Meta;
use crate::write::idx;

/// Flag bit 0: `in_use`.
const IN_USE: u32 = 1;
/// Flag bit 1: `auto` (enabled).
const AUTO: u32 = 2;

/// One bitmap tracking writes in memory.
#[derive(Clone, Debug)]
pub(crate) struct Tracked {
    /// Bitmap name (the directory key).
    pub(crate) name: String,
    /// Guest bytes per bit.
    pub(crate) granularity: u64,
    /// Bit `i` of byte `k` covers granule `8k + i`.
    pub(crate) bits: Vec<u8>,
    /// Whether writes set bits (a disabled bitmap is only loaded to be resized).
    pub(crate) enabled: bool,
}

impl Tracked {
    /// Resizes the bitmap for a `size`-byte disk: new bits are clear, bits beyond the
    /// end are dropped (qemu `hbitmap_truncate`).
    pub(crate) fn truncate(&mut self, size: u64) {
        let g = self.granularity.max(1);
        let granules = size.div_ceil(g);
        self.bits.resize(idx(granules.div_ceil(8)), 0);
        if !granules.is_multiple_of(8)
            && let Some(b) = self.bits.last_mut()
        {
            *b &= (1u8 << (granules % 8)) - 1;
        }
    }

    /// Sets the bits of every granule overlapping `off..off+len`.
    pub(crate) fn mark(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.granularity.max(1);
        let first = off / g;
        let last = off.saturating_add(len - 1) / g;
        let mut i = first;
        while i <= last {
            // Whole bytes at once in the middle of long ranges.
            if i.is_multiple_of(8) && last - i >= 7 {
                let n = (last - i + 1) / 8;
                let lo = idx(i / 8);
                let hi = lo.saturating_add(idx(n)).min(self.bits.len());
                if let Some(s) = self.bits.get_mut(lo..hi) {
                    s.fill(0xff);
                }
                i += n * 8;
                continue;
            }
            if let Some(b) = self.bits.get_mut(idx(i / 8)) {
                *b |= 1 << (i % 8);
            }
            i += 1;
        }
    }
}

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
        m.file.flush()?;
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
        m.file.flush()?;
    }
    for t in tracked.iter() {
        m.limits.check(
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
    m.file.flush()?;
    let mut dir = read_directory(m)?;
    let mut free = Vec::new();
    let size = m.size;
    for t in tracked {
        let mut t = t.clone();
        t.truncate(size);
        let e = dir
            .iter_mut()
            .find(|e| e.name == t.name)
            .ok_or(Error::corrupt(
                "qcow2",
                "tracked bitmap left the directory",
                0,
            ))?;
        let old = e.clone();
        let (table, size) = write_bits(m, &t.bits)?;
        free.extend(table_clusters(m, &old)?);
        e.table_offset = table;
        e.table_size = size;
        e.flags &= !IN_USE;
    }
    write_directory(m, &dir)?;
    m.file.flush()?;
    for (o, l) in free {
        m.unref_range(o, l)?;
    }
    m.file.flush()
}

impl Qcow2Device {
    /// Flushes and writes the persistent dirty bitmaps back (clearing their `in_use`
    /// flag), as closing the image in qemu does; dropping the device does the same but
    /// ignores errors. Writes are refused afterwards (no bitmap would see them); a
    /// second call does nothing.
    pub fn close(&self) -> Result<()> {
        if !self.closed.close() || self.read_only {
            return Ok(());
        }
        self.flush()?;
        // The clusters allocated ahead go back: a closed image has no leaks.
        if self.lock().release_reserve()? {
            self.file.flush()?;
        }
        let tracked = std::mem::take(&mut *self.tracked.lock().unwrap_or_else(|e| e.into_inner()));
        store(&mut self.lock(), &tracked)
    }

    /// Sets the bits covering `off..off+len` in every bitmap that tracks writes.
    pub(crate) fn mark_dirty(&self, off: u64, len: u64) {
        let mut t = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        for b in t.iter_mut().filter(|b| b.enabled) {
            b.mark(off, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(g: u64, n: usize) -> Tracked {
        Tracked {
            name: "b".into(),
            granularity: g,
            bits: vec![0; n],
            enabled: true,
        }
    }

    #[test]
    fn marks_every_touched_granule() {
        let mut b = t(512, 4);
        b.mark(511, 2);
        assert_eq!(b.bits, [0b11, 0, 0, 0]);
        b.mark(8 * 512, 16 * 512);
        assert_eq!(b.bits, [0b11, 0xff, 0xff, 0]);
        b.mark(30 * 512, 1 << 20); // clipped at the end of the bitmap
        assert_eq!(b.bits, [0b11, 0xff, 0xff, 0xc0]);
        b.mark(3 * 512, 0);
        assert_eq!(b.bits[0], 0b11);
        let mut c = t(4096, 2);
        c.mark(4096 * 3 + 5, 4096 * 9);
        assert_eq!(c.bits, [0xf8, 0x1f]);
        c.truncate(4096 * 11);
        assert_eq!(c.bits, [0xf8, 0x07]);
        c.truncate(4096 * 17);
        assert_eq!(c.bits, [0xf8, 0x07, 0]);
        c.truncate(4096 * 4);
        assert_eq!(c.bits, [0x08]);
    }
}
