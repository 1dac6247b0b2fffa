//! [`Tracked`]: a persistent dirty bitmap held in memory while the image is open
//! read-write (`features/dirty.rs` loads and stores it; the device marks it on writes).

use crate::disk::idx;

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
