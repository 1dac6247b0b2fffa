//! Buffer memory on transparent huge pages, for `O_DIRECT` requests.
//!
//! Why: an `O_DIRECT` request is split into device requests by the queue's limits on
//! segments (`max_segments`, `max_segment_size`). From ordinary 4 KiB pages every page
//! is a segment of its own (a loop device takes 128: a 2 MiB write becomes four
//! requests of 512 KiB); from a 2 MiB huge page the pages are physically contiguous,
//! segments merge, and the same write is two requests of up to the queue's
//! `max_sectors_kb` (1280 KiB on a loop device). fio on the big benchmark's loop device
//! (docs/benchmarks.md, session 9): 2 MiB writes at queue depth 4 reached 1.8–2.3 GB/s
//! from small pages and 3.0 GB/s from huge ones.
//!
//! Buffers of at least 2 MiB come from an anonymous mapping advised `MADV_HUGEPAGE`
//! (transparent huge pages in mode `madvise`, the common default) over their whole
//! huge pages only, so a buffer never holds more memory than its length rounded up to a
//! small page. When the kernel has no huge page to give, or the mapping fails, the
//! bytes are ordinary memory and only the speed differs.

use memmap2::{Advice, MmapMut, MmapOptions};

/// A huge page.
pub(crate) const HUGE: usize = 2 << 20;

/// Where a buffer's bytes live; [`Mem::bytes`] start on a boundary of `align` (small
/// buffers) or of [`HUGE`] (mapped ones).
pub(crate) enum Mem {
    /// Ordinary memory, over-allocated by the alignment.
    Heap(Vec<u8>),
    /// An anonymous mapping, over-allocated by a huge page.
    Map(MmapMut),
}

impl std::fmt::Debug for Mem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_mapped() { "mapped" } else { "heap" };
        write!(f, "Mem({kind}, {} bytes)", self.all().len())
    }
}

impl Default for Mem {
    fn default() -> Self {
        Mem::Heap(Vec::new())
    }
}

impl Mem {
    /// Memory for a buffer of `len` bytes starting on an `align` boundary (zeroed).
    pub(crate) fn new(len: usize, align: usize) -> Self {
        if len >= HUGE
            && let Some(room) = len.checked_add(HUGE)
            && let Ok(map) = MmapOptions::new().len(room).map_anon()
        {
            let start = Self::offset_in(map.as_ptr(), HUGE);
            // Advice only: without it the pages are small.
            let _ = map.advise_range(Advice::HugePage, start, len / HUGE * HUGE);
            return Mem::Map(map);
        }
        Mem::Heap(vec![0; len.saturating_add(align)])
    }

    /// Where the buffer starts in the allocation.
    pub(crate) fn start(&self, align: usize) -> usize {
        match self {
            Mem::Heap(v) => Self::offset_in(v.as_ptr(), align),
            Mem::Map(m) => Self::offset_in(m.as_ptr(), HUGE),
        }
    }

    fn offset_in(ptr: *const u8, align: usize) -> usize {
        ptr.align_offset(align).min(align)
    }

    /// The whole allocation.
    pub(crate) fn all(&self) -> &[u8] {
        match self {
            Mem::Heap(v) => v,
            Mem::Map(m) => m,
        }
    }

    /// The whole allocation, writable.
    pub(crate) fn all_mut(&mut self) -> &mut [u8] {
        match self {
            Mem::Heap(v) => v,
            Mem::Map(m) => m,
        }
    }

    /// Bytes a buffer starting at `start` can hold.
    pub(crate) fn room(&self, start: usize) -> usize {
        self.all().len().saturating_sub(start)
    }

    /// True for an allocation that is not plain memory (it cannot grow in place).
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self, Mem::Map(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_on_the_heap_large_mapped_on_a_huge_boundary() {
        let small = Mem::new(HUGE - 1, 4096);
        assert!(!small.is_mapped());
        assert_eq!(small.all()[small.start(4096)..].as_ptr() as usize % 4096, 0);
        assert!(small.room(small.start(4096)) >= HUGE - 1);
        let mut big = Mem::new(HUGE + 5, 4096);
        let s = big.start(4096);
        if big.is_mapped() {
            assert_eq!(big.all()[s..].as_ptr() as usize % HUGE, 0);
        }
        assert!(big.room(s) >= HUGE + 5);
        big.all_mut()[s + HUGE + 4] = 9;
        assert_eq!(big.all()[s + HUGE + 4], 9);
        assert!(big.all()[s..s + HUGE].iter().all(|&b| b == 0));
    }
}
