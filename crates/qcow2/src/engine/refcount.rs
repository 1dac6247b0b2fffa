//! Refcounts (spec "Reference counts"): reading and writing entries of any width, new
//! refcount blocks and refcount table growth, ordered so that a crash leaves at most leaks.

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{DebugEvent, Error, Result};

use crate::disk::table::{REFT_OFFSET_MASK, encode_u64s};
use crate::engine::meta::Meta;
use crate::engine::overlap::MetaKind;

/// Reads entry `i` of a refcount block of width `1 << order` bits.
pub(crate) fn get_entry(block: &[u8], i: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    let bit = i * bits;
    let Ok(byte) = usize::try_from(bit / 8) else {
        return 0;
    };
    if bits >= 8 {
        let n = usize::try_from(bits / 8).unwrap_or(8);
        let Some(s) = block.get(byte..byte + n) else {
            return 0;
        };
        s.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    } else {
        let shift = bit % 8;
        let b = block.get(byte).copied().unwrap_or(0);
        (u64::from(b) >> shift) & ((1 << bits) - 1)
    }
}

/// Sets entry `i`; returns the byte range changed.
pub(crate) fn set_entry(block: &mut [u8], i: u64, order: u32, v: u64) -> (usize, usize) {
    let bits = 1u64 << order;
    let bit = i * bits;
    let byte = usize::try_from(bit / 8).unwrap_or(usize::MAX);
    if bits >= 8 {
        let n = usize::try_from(bits / 8).unwrap_or(8);
        let be = v.to_be_bytes();
        let src = be.get(8 - n..).unwrap_or(&[]);
        block.put(byte, src);
        (byte, byte + n)
    } else {
        let shift = bit % 8;
        let mask = u8::try_from(((1u64 << bits) - 1) << shift).unwrap_or(0xff);
        let val = u8::try_from((v << shift) & u64::from(mask)).unwrap_or(0);
        if let Some(b) = block.get_mut(byte) {
            *b = (*b & !mask) | val;
        }
        (byte, byte + 1)
    }
}

/// Largest refcount an entry of `2^order` bits holds.
pub(crate) fn max_refcount_of(order: u32) -> u64 {
    match 1u64 << order.min(6) {
        64 => u64::MAX,
        b => (1u64 << b) - 1,
    }
}

impl Meta {
    /// Allocates `size` bytes for compressed data (qemu's `qcow2_alloc_bytes`), packing
    /// into the last partly used cluster and, as qemu does, spilling into freshly
    /// allocated clusters that directly follow it. Every cluster the range touches is
    /// referenced once more before the caller points an L2 entry at it.
    pub(crate) fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        self.file.debug_event(DebugEvent::ClusterAllocBytes);
        let cs = self.cs();
        let fb = self.free_byte;
        let next_free = |end: u64| if end.is_multiple_of(cs) { 0 } else { end };
        if fb != 0 && !fb.is_multiple_of(cs) {
            let c = fb / cs;
            let r = self.refcount(c)?;
            if r > 0 && r < self.max_refcount() {
                let room = cs - fb % cs;
                if size <= room {
                    self.set_refcount(c, r + 1)?;
                    self.free_byte = next_free(fb + size);
                    return Ok(fb);
                }
                let need = (size - room).div_ceil(cs);
                let run = self.alloc_run(need)?;
                if run == (c + 1) * cs {
                    self.set_refcount(c, r + 1)?;
                    self.free_byte = next_free(fb + size);
                    return Ok(fb);
                }
                // Not adjacent: give the run back (a crash here only leaks it).
                for k in 0..need {
                    self.set_refcount(run / cs + k, 0)?;
                }
            }
        }
        let host = self.alloc_run(size.div_ceil(cs))?;
        self.free_byte = next_free(host + size);
        Ok(host)
    }

    /// Refcount entries per refcount block.
    pub(crate) fn rb_entries(&self) -> u64 {
        self.cs() * 8 / u64::from(self.h.refcount_bits())
    }

    /// Largest refcount the width can hold.
    pub(crate) fn max_refcount(&self) -> u64 {
        max_refcount_of(self.h.refcount_order)
    }

    /// The offset of refcount block `ti` (0: none). A misaligned one is a corruption
    /// event (qemu's words; the image is marked corrupt).
    fn refblock_offset(&mut self, ti: u64) -> Result<u64> {
        let Some(e) = usize::try_from(ti).ok().and_then(|i| self.reftable.get(i)) else {
            return Ok(0);
        };
        let off = e & REFT_OFFSET_MASK;
        if let Some(what) = self.refblock_misaligned(ti) {
            let at = self.h.refcount_table_offset + ti * 8;
            return Err(self.corruption(what, at));
        }
        Ok(off)
    }

    /// When the refcount table entry `ti` points to a misaligned refcount block: the
    /// corruption event's words (qemu's `get_refblock_offset`).
    pub(crate) fn refblock_misaligned(&self, ti: u64) -> Option<String> {
        let e = usize::try_from(ti)
            .ok()
            .and_then(|i| self.reftable.get(i))?;
        let off = e & REFT_OFFSET_MASK;
        (!off.is_multiple_of(self.cs())).then(|| {
            format!(
                "Refblock offset {off:#x} unaligned (reftable index: {})",
                crate::invalid_entry::hex(ti)
            )
        })
    }

    fn refblock(&mut self, off: u64) -> Result<&mut Vec<u8>> {
        if !self.rb.contains_key(&off) {
            let cap = usize::try_from(self.limits.max_cache_bytes / 2 / self.cs()).unwrap_or(16);
            if self.rb.len() >= cap.max(4) {
                self.write_held()?;
                self.rb.clear();
            }
            let mut buf = self.limits.alloc("refcount block", self.cs())?;
            match off.checked_add(self.cs()) {
                Some(end) if end <= self.file.len()? => {}
                _ => {
                    return Err(Error::corrupt(
                        "qcow2",
                        "refcount block beyond the end of the file",
                        off,
                    ));
                }
            }
            self.file.read_exact_at(&mut buf, off)?;
            self.rb.insert(off, buf);
        }
        self.rb
            .get_mut(&off)
            .ok_or(Error::corrupt("qcow2", "refcount cache", off))
    }

    /// True when a refcount block covers host cluster `c`.
    pub(crate) fn refblock_covers(&mut self, c: u64) -> Result<bool> {
        let rbe = self.rb_entries();
        Ok(self.refblock_offset(c / rbe)? != 0)
    }

    /// The refcount of host cluster `c` (0 where no refcount block exists).
    pub(crate) fn refcount(&mut self, c: u64) -> Result<u64> {
        let rbe = self.rb_entries();
        let off = self.refblock_offset(c / rbe)?;
        if off == 0 {
            return Ok(0);
        }
        let order = self.h.refcount_order;
        let b = self.refblock(off)?;
        Ok(get_entry(b, c % rbe, order))
    }

    /// Sets the refcount of host cluster `c`, creating refcount blocks and growing the
    /// refcount table as needed (each new structure is flushed before it is referenced).
    /// Setting 0 moves the host epoch (`epoch`): the cluster may be reused from now on.
    pub(crate) fn set_refcount(&mut self, c: u64, v: u64) -> Result<()> {
        if v > self.max_refcount() {
            return Err(Error::invalid("qcow2: refcount overflow"));
        }
        if v == 0 {
            self.epoch.bump();
        }
        let rbe = self.rb_entries();
        let ti = c / rbe;
        if ti >= self.reftable.len() as u64 {
            self.grow_reftable(ti, c)?;
        }
        self.file.debug_event(DebugEvent::RefblockAlloc);
        let off = self.refblock_offset(ti)?;
        if off == 0 {
            return self.new_refblock(ti, c, v);
        }
        self.file.debug_event(DebugEvent::RefblockLoad);
        let order = self.h.refcount_order;
        let b = self.refblock(off)?;
        let (s, e) = set_entry(b, c % rbe, order, v);
        let bytes = b.get(s..e).unwrap_or(&[]).to_vec();
        self.put_refblock(off, s, &bytes)?;
        if v == 0 {
            self.overlap.forget(c, 1);
            if c < self.free_hint {
                self.free_hint = c;
            }
            if self.free_byte / self.cs() == c {
                self.free_byte = 0;
            }
        }
        Ok(())
    }

    /// A free cluster at or after `from`, other than `avoid`.
    fn find_free(&mut self, from: u64, avoid: u64) -> Result<u64> {
        let mut r = from.max(1);
        loop {
            if r.saturating_mul(self.cs()) >= crate::disk::header::MAX_HOST_OFFSET {
                return Err(Error::invalid("qcow2: image file too large"));
            }
            if r != avoid && self.refcount(r)? == 0 {
                return Ok(r);
            }
            r += 1;
        }
    }

    fn new_refblock(&mut self, ti: u64, c: u64, v: u64) -> Result<()> {
        let rbe = self.rb_entries();
        let from = self.alloc_floor.max(self.free_hint);
        let r = self.find_free(from, c)?;
        self.refuse_bad_alloc(r, 1, None)?;
        let order = self.h.refcount_order;
        let mut block = self.limits.alloc("refcount block", self.cs())?;
        if r / rbe == ti {
            set_entry(&mut block, r % rbe, order, 1);
        } else {
            self.set_refcount(r, 1)?;
        }
        set_entry(&mut block, c % rbe, order, v);
        let off = r * self.cs();
        self.file.debug_event(DebugEvent::RefblockAllocWrite);
        self.file.write_all_at(&block, off)?;
        self.file.flush()?;
        let entry_off = self.h.refcount_table_offset + ti * 8;
        self.file.debug_event(DebugEvent::RefblockAllocHookup);
        self.file.write_all_at(&off.to_be_bytes(), entry_off)?;
        if let Some(slot) = usize::try_from(ti)
            .ok()
            .and_then(|i| self.reftable.get_mut(i))
        {
            *slot = off;
        }
        self.rb.insert(off, block);
        self.note_meta(MetaKind::RefcountBlock, off, self.cs());
        Ok(())
    }

    /// Moves the refcount table to a bigger one that has an entry `ti`, placed past the
    /// end of the file (and past cluster `avoid`).
    fn grow_reftable(&mut self, ti: u64, avoid: u64) -> Result<()> {
        self.file.debug_event(DebugEvent::ReftableGrow);
        let cs = self.cs();
        let rbe = self.rb_entries();
        let file_end = self.file.len()?.div_ceil(cs);
        let p = file_end.max(avoid + 1).max(self.alloc_floor);
        let mut entries = (ti + 1).max(self.reftable.len() as u64 * 2);
        let (t, missing) = loop {
            let t = (entries * 8).div_ceil(cs);
            let mut b = 0u64;
            let missing = loop {
                let end = p + t + b;
                let mut m: Vec<u64> = Vec::new();
                for blk in p / rbe..=(end - 1) / rbe {
                    if self.refblock_offset(blk)? == 0 {
                        m.push(blk);
                    }
                }
                if m.len() as u64 == b {
                    break m;
                }
                b = m.len() as u64;
            };
            let max_ti = missing.last().copied().unwrap_or(0).max(ti);
            if max_ti < t * cs / 8 {
                break (t, missing);
            }
            entries = max_ti + 1;
        };
        self.limits.check("refcount table", t * cs)?;
        let order = self.h.refcount_order;
        let end = p + t + missing.len() as u64;
        let mut table = self
            .limits
            .alloc_elems::<u64>("refcount table", t * cs / 8, 8)?;
        for (dst, src) in table.iter_mut().zip(self.reftable.iter()) {
            *dst = *src;
        }
        self.file.debug_event(DebugEvent::RefblockAllocWriteBlocks);
        for (k, blk) in missing.iter().enumerate() {
            let boff = (p + t + k as u64) * cs;
            let mut block = self.limits.alloc("refcount block", cs)?;
            for cl in p.max(blk * rbe)..end.min((blk + 1) * rbe) {
                set_entry(&mut block, cl % rbe, order, 1);
            }
            self.file.write_all_at(&block, boff)?;
            if let Some(slot) = usize::try_from(*blk).ok().and_then(|i| table.get_mut(i)) {
                *slot = boff;
            }
        }
        // Existing blocks covering the new area need their counts too.
        for cl in p..end {
            let blk = cl / rbe;
            if !missing.contains(&blk) {
                let off = self.refblock_offset(blk)?;
                let b = self.refblock(off)?;
                let (s, e) = set_entry(b, cl % rbe, order, 1);
                let bytes = b.get(s..e).unwrap_or(&[]).to_vec();
                self.put_refblock(off, s, &bytes)?;
            }
        }
        self.file.debug_event(DebugEvent::RefblockAllocWriteTable);
        self.file.write_all_at(&encode_u64s(&table), p * cs)?;
        self.file.flush()?;
        let mut hdr = [0u8; 12];
        hdr.put_be_u64(0, p * cs);
        hdr.put_be_u32(
            8,
            u32::try_from(t).map_err(|_| Error::invalid("reftable size"))?,
        );
        self.file.debug_event(DebugEvent::RefblockAllocSwitchTable);
        self.file.write_all_at(&hdr, 48)?;
        self.file.flush()?;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.h.refcount_table_offset = p * cs;
        self.h.refcount_table_clusters = u32::try_from(t).unwrap_or(u32::MAX);
        self.reftable = table;
        self.note_meta(MetaKind::RefcountTable, p * cs, t * cs);
        self.note_meta(
            MetaKind::RefcountBlock,
            (p + t) * cs,
            missing.len() as u64 * cs,
        );
        for k in 0..old_clusters {
            self.set_refcount(old_off / cs + k, 0)?;
        }
        Ok(())
    }

    /// Allocates `n` contiguous free clusters (refcount 1, written, not yet flushed) and
    /// returns the host offset of the first.
    pub(crate) fn alloc_run(&mut self, n: u64) -> Result<u64> {
        self.alloc_run_for(n, None)
    }

    /// [`Meta::alloc_run`] for the structure `what` names (qemu's words in the
    /// corruption message when corrupt refcounts place it at offset 0). An allocation
    /// on live metadata (corrupt refcounts) is refused and marks the image corrupt.
    pub(crate) fn alloc_run_for(&mut self, n: u64, what: Option<&str>) -> Result<u64> {
        self.file.debug_event(DebugEvent::ClusterAlloc);
        let cs = self.cs();
        // qemu's `alloc_clusters_noref`: the search starts at the hint and the hint
        // moves past the run found, over any shorter gap passed on the way; only a
        // cluster freed below it brings it back. So a gap too short for one allocation
        // is not reused by the next ones either, and the file's layout (and where a
        // size-limited file runs out of room) is qemu's.
        let mut c = self.free_hint;
        'outer: loop {
            if (c + n) * cs > crate::disk::header::MAX_HOST_OFFSET {
                return Err(Error::invalid("qcow2: image file too large"));
            }
            for k in 0..n {
                if self.refcount(c + k)? != 0 {
                    c += k + 1;
                    continue 'outer;
                }
            }
            break;
        }
        self.refuse_bad_alloc(c, n, what)?;
        if let Some(r) = self.take_reserve_front(c, n) {
            return Ok(r * cs);
        }
        self.alloc_floor = c + n;
        let r = self.set_refcount_run(c, n, 1);
        self.alloc_floor = 0;
        r?;
        self.free_hint = c + n;
        Ok(c * cs)
    }

    /// Sets the refcounts of clusters `c..c+n` to `v`, writing each touched refcount
    /// block once (one byte range) where the block exists. Setting 0 moves the host
    /// epoch (`epoch`), as [`Meta::set_refcount`] does.
    pub(crate) fn set_refcount_run(&mut self, c: u64, n: u64, v: u64) -> Result<()> {
        if v == 0 {
            self.epoch.bump();
        }
        self.refcount_run(c, n, v)
    }

    /// [`Meta::set_refcount_run`] without moving the host epoch for its own sake: for
    /// clusters no L2 entry ever pointed to (the write reserve given back). Entries
    /// without a refcount block still go through [`Meta::set_refcount`].
    pub(in crate::engine) fn refcount_run(&mut self, c: u64, n: u64, v: u64) -> Result<()> {
        let rbe = self.rb_entries();
        let order = self.h.refcount_order;
        if v == 0 {
            self.overlap.forget(c, n);
            self.free_hint = self.free_hint.min(c);
        }
        let mut k = 0;
        while k < n {
            let cl = c + k;
            let ti = cl / rbe;
            let off = if ti < self.reftable.len() as u64 {
                self.refblock_offset(ti)?
            } else {
                0
            };
            if off == 0 || v > self.max_refcount() {
                self.set_refcount(cl, v)?;
                k += 1;
                continue;
            }
            let last = (c + n).min((ti + 1) * rbe);
            self.file.debug_event(DebugEvent::RefblockAlloc);
            self.file.debug_event(DebugEvent::RefblockLoad);
            let b = self.refblock(off)?;
            let (mut lo, mut hi) = (usize::MAX, 0usize);
            for x in cl..last {
                let (s, e) = set_entry(b, x % rbe, order, v);
                lo = lo.min(s);
                hi = hi.max(e);
            }
            let bytes = b.get(lo..hi).unwrap_or(&[]).to_vec();
            self.put_refblock(off, lo, &bytes)?;
            k += last - cl;
        }
        Ok(())
    }

    /// Drops one reference from every host cluster overlapping `off..off+len`.
    pub(crate) fn unref_range(&mut self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cs = self.cs();
        for c in off / cs..=(off + len - 1) / cs {
            let r = self.refcount(c)?;
            if r == 0 {
                return Err(Error::corrupt(
                    "qcow2",
                    "freeing a cluster with refcount 0",
                    c * cs,
                ));
            }
            self.set_refcount(c, r - 1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            set_entry(&mut b, 3, order, max);
            set_entry(&mut b, 4, order, 1);
            assert_eq!(get_entry(&b, 3, order), max);
            assert_eq!(get_entry(&b, 4, order), 1);
            assert_eq!(get_entry(&b, 2, order), 0);
        }
    }
}
