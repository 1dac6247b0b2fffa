//! [`Tracked`]: a persistent dirty bitmap held in memory while the image is open
//! read-write (`features/dirty.rs` loads and stores it; the device marks it on writes).
//!
//! The bits are kept in chunks of one cluster of bitmap data (the unit of the bitmap
//! table, and what qemu stores per data cluster); a chunk with no bit set is not held.
//! So memory follows the bitmap's data clusters and the bits set since, not the size of
//! the disk: a 2 TiB disk's bitmap of 512-byte granularity (512 MiB of bits) costs
//! nothing until bits are set.

use crate::disk::idx;

/// One bitmap held in memory.
#[derive(Clone, Debug)]
pub(crate) struct Tracked {
    /// Bitmap name (the directory key).
    pub(crate) name: String,
    /// Guest bytes per bit.
    pub(crate) granularity: u64,
    /// Whether writes set bits (qemu's `auto` flag).
    pub(crate) enabled: bool,
    /// Bit `i` of byte `k` of the bitmap covers granule `8k + i`; byte `k` is in chunk
    /// `k / chunk` (`None`: every bit of the chunk clear). Bytes past `len` are zero.
    chunks: Vec<Option<Box<[u8]>>>,
    /// Bytes per chunk (the cluster size).
    chunk: usize,
    /// Bytes of bits for the disk's size.
    len: usize,
}

impl Tracked {
    /// An empty bitmap for a `size`-byte disk, in chunks of `chunk` bytes.
    pub(crate) fn new(name: &str, granularity: u64, enabled: bool, size: u64, chunk: u64) -> Self {
        let mut t = Tracked {
            name: name.to_string(),
            granularity: granularity.max(1),
            enabled,
            chunks: Vec::new(),
            chunk: idx(chunk).max(1),
            len: 0,
        };
        t.truncate(size);
        t
    }

    /// Sets chunk `k` to `data` (at most one chunk; the rest of the chunk is clear).
    pub(crate) fn set_chunk(&mut self, k: usize, data: &[u8]) {
        let (chunk, len) = (self.chunk, self.len);
        let Some(slot) = self.chunks.get_mut(k) else {
            return;
        };
        if data.iter().all(|&b| b == 0) {
            *slot = None;
            return;
        }
        let mut c = vec![0u8; chunk].into_boxed_slice();
        let n = data.len().min(chunk).min(len.saturating_sub(k * chunk));
        if let (Some(d), Some(s)) = (c.get_mut(..n), data.get(..n)) {
            d.copy_from_slice(s);
        }
        *slot = Some(c);
        self.mask_tail();
    }

    /// The chunks in order (`None`: all clear), each `chunk` bytes.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = Option<&[u8]>> {
        self.chunks.iter().map(|c| c.as_deref())
    }

    /// How many chunks the bitmap has (its table's entries).
    pub(crate) fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Clears every bit.
    pub(crate) fn clear(&mut self) {
        self.chunks.iter_mut().for_each(|c| *c = None);
    }

    /// Bytes held for set bits (for limits).
    pub(crate) fn held_bytes(&self) -> u64 {
        self.chunks.iter().flatten().count() as u64 * self.chunk as u64
    }

    /// Bytes of bits for the disk's size (what [`Tracked::copy_to`] fills).
    pub(crate) fn dense_len(&self) -> usize {
        self.len
    }

    /// Copies the bits into `out` (the first [`Tracked::dense_len`] bytes; bytes of
    /// chunks not held are left as they are, so `out` should start zeroed).
    pub(crate) fn copy_to(&self, out: &mut [u8]) {
        for (k, c) in self.chunks.iter().enumerate() {
            if let Some(c) = c {
                let lo = k * self.chunk;
                let hi = (lo + self.chunk).min(self.len);
                if let (Some(d), Some(s)) = (out.get_mut(lo..hi), c.get(..hi - lo)) {
                    d.copy_from_slice(s);
                }
            }
        }
    }

    /// The bits as one buffer of `len` bytes.
    #[cfg(test)]
    pub(crate) fn to_dense(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        self.copy_to(&mut out);
        out
    }

    /// ORs in the bits of `src` (a bitmap of granularity `gs` of a `size`-byte disk):
    /// every granule here overlapping a set granule there is set.
    pub(crate) fn merge(&mut self, size: u64, src: &[u8], gs: u64) {
        self.merge_at(size, src, gs, 0);
    }

    /// [`Tracked::merge`] of the bits of another held bitmap.
    pub(crate) fn merge_from(&mut self, size: u64, src: &Tracked) {
        for (k, c) in src.chunks().enumerate() {
            if let Some(c) = c {
                self.merge_at(size, c, src.granularity, (k * src.chunk) as u64);
            }
        }
    }

    /// [`Tracked::merge`] of `src`, whose first byte is byte `first` of its bitmap.
    fn merge_at(&mut self, size: u64, src: &[u8], gs: u64, first: u64) {
        let gs = gs.max(1);
        for (k, &b) in src.iter().enumerate() {
            if b == 0 {
                continue;
            }
            for i in 0..8u64 {
                if b & (1 << i) == 0 {
                    continue;
                }
                let start = ((first + k as u64) * 8 + i).saturating_mul(gs);
                if start >= size {
                    return;
                }
                self.mark(start, gs.min(size - start));
            }
        }
    }

    /// Resizes the bitmap for a `size`-byte disk: new bits are clear, bits beyond the
    /// end are dropped (qemu `hbitmap_truncate`).
    pub(crate) fn truncate(&mut self, size: u64) {
        let granules = size.div_ceil(self.granularity);
        self.len = idx(granules.div_ceil(8));
        self.chunks.resize(self.len.div_ceil(self.chunk), None);
        self.mask_tail();
        if !granules.is_multiple_of(8)
            && let Some(b) = self.byte_if_held(self.len - 1)
        {
            *b &= (1u8 << (granules % 8)) - 1;
        }
    }

    /// Clears the bytes of the last chunk past `len`.
    fn mask_tail(&mut self) {
        let (chunk, len) = (self.chunk, self.len);
        let last = self.chunks.len().saturating_sub(1);
        if let Some(Some(c)) = self.chunks.last_mut() {
            let from = len - last * chunk;
            if let Some(t) = c.get_mut(from..) {
                t.fill(0);
            }
        }
    }

    fn byte_if_held(&mut self, i: usize) -> Option<&mut u8> {
        let chunk = self.chunk;
        self.chunks.get_mut(i / chunk)?.as_mut()?.get_mut(i % chunk)
    }

    /// Chunk `k`, held (all clear when new).
    fn chunk_mut(&mut self, k: usize) -> Option<&mut [u8]> {
        let chunk = self.chunk;
        let slot = self.chunks.get_mut(k)?;
        Some(slot.get_or_insert_with(|| vec![0u8; chunk].into_boxed_slice()))
    }

    /// Sets every bit of bytes `lo..hi`.
    fn fill_bytes(&mut self, lo: usize, hi: usize) {
        let hi = hi.min(self.len);
        let mut i = lo;
        while i < hi {
            let (k, o) = (i / self.chunk, i % self.chunk);
            let n = (self.chunk - o).min(hi - i);
            if let Some(d) = self.chunk_mut(k).and_then(|c| c.get_mut(o..o + n)) {
                d.fill(0xff);
            }
            i += n;
        }
    }

    /// Sets the bits of every granule overlapping `off..off+len`.
    pub(crate) fn mark(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.granularity;
        let first = off / g;
        let last = off.saturating_add(len - 1) / g;
        let mut i = first;
        while i <= last {
            // Whole bytes at once in the middle of long ranges.
            if i.is_multiple_of(8) && last - i >= 7 {
                let n = (last - i + 1) / 8;
                let lo = idx(i / 8);
                self.fill_bytes(lo, lo.saturating_add(idx(n)));
                i += n * 8;
                continue;
            }
            let k = idx(i / 8);
            if k >= self.len {
                return;
            }
            let chunk = self.chunk;
            if let Some(b) = self.chunk_mut(k / chunk).and_then(|c| c.get_mut(k % chunk)) {
                *b |= 1 << (i % 8);
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bitmap of `n` bytes of granularity `g` (chunks of 2 bytes, to cross them).
    fn t(g: u64, n: u64) -> Tracked {
        Tracked::new("b", g, true, g * 8 * n, 2)
    }

    #[test]
    fn marks_every_touched_granule() {
        let mut b = t(512, 4);
        b.mark(511, 2);
        assert_eq!(b.to_dense(), [0b11, 0, 0, 0]);
        b.mark(8 * 512, 16 * 512);
        assert_eq!(b.to_dense(), [0b11, 0xff, 0xff, 0]);
        b.mark(30 * 512, 1 << 20); // clipped at the end of the bitmap
        assert_eq!(b.to_dense(), [0b11, 0xff, 0xff, 0xc0]);
        b.mark(3 * 512, 0);
        assert_eq!(b.to_dense()[0], 0b11);
        let mut c = t(4096, 2);
        c.mark(4096 * 3 + 5, 4096 * 9);
        assert_eq!(c.to_dense(), [0xf8, 0x1f]);
        c.truncate(4096 * 11);
        assert_eq!(c.to_dense(), [0xf8, 0x07]);
        c.truncate(4096 * 17);
        assert_eq!(c.to_dense(), [0xf8, 0x07, 0]);
        c.truncate(4096 * 4);
        assert_eq!(c.to_dense(), [0x08]);
    }

    #[test]
    fn clear_chunks_are_not_held() {
        let mut b = t(512, 6);
        assert_eq!(b.held_bytes(), 0);
        b.mark(512 * 8 * 2, 512);
        assert_eq!((b.held_bytes(), b.chunk_count()), (2, 3));
        assert_eq!(b.to_dense(), [0, 0, 1, 0, 0, 0]);
        b.set_chunk(1, &[0, 0]);
        assert_eq!(b.held_bytes(), 0);
        b.set_chunk(2, &[0xff, 0xff]);
        b.clear();
        assert_eq!(b.to_dense(), [0; 6]);
    }

    #[test]
    fn merge_maps_granules() {
        // One 4 KiB granule set in the source covers 8 granules of 512 bytes here.
        let mut b = t(512, 4);
        b.merge(512 * 32, &[0b10], 4096);
        assert_eq!(b.to_dense(), [0, 0xff, 0, 0]);
        let mut c = t(4096, 1);
        c.merge(4096 * 8, &[0, 0x80, 0, 0], 512);
        assert_eq!(c.to_dense(), [0b10]);
    }
}
