//! Copy buffers on transparent huge pages, for `O_DIRECT` writes.
//!
//! Why: an `O_DIRECT` write is split into device requests by the queue's limits on
//! segments (`max_segments`, `max_segment_size`). From ordinary 4 KiB pages every page
//! is a segment of its own (a loop device takes 128: a 2 MiB write becomes four
//! requests of 512 KiB); from a 2 MiB huge page the pages are physically contiguous,
//! segments merge, and the same write is one or two requests up to the queue's
//! `max_sectors_kb`. fio on the big benchmark's loop device (docs/benchmarks.md,
//! session 9): 2 MiB writes at queue depth 4 reached 1.8–2.3 GB/s from small pages and
//! 3.0 GB/s from huge ones.
//!
//! The pages come from an anonymous mapping advised `MADV_HUGEPAGE` (transparent huge
//! pages in mode `madvise`, the common default); when the kernel has none to give, or
//! the mapping fails, the buffer is plain memory and only the speed differs.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use diskimg_blockio::{Error, Result};
use memmap2::{Advice, MmapMut, MmapOptions};

/// A huge page.
const HUGE: usize = 2 << 20;

/// Where a buffer's bytes live.
enum Mem {
    /// An anonymous mapping; the buffer starts at its first huge-page boundary.
    Map(MmapMut, usize),
    /// Ordinary memory (the mapping failed).
    Heap(Vec<u8>),
}

/// A buffer of `len` bytes on huge pages where the kernel gives them.
pub(crate) struct HugeBuf {
    mem: Mem,
    len: usize,
}

impl HugeBuf {
    /// A buffer of `len` bytes (contents unspecified).
    fn new(len: usize) -> Self {
        let span = len.div_ceil(HUGE).saturating_mul(HUGE);
        let map = span
            .checked_add(HUGE)
            .and_then(|room| MmapOptions::new().len(room).map_anon().ok());
        match map {
            Some(map) => {
                let start = map.as_ptr().align_offset(HUGE).min(HUGE);
                // Advice only: without it the pages are small.
                let _ = map.advise_range(Advice::HugePage, start, span);
                Self {
                    mem: Mem::Map(map, start),
                    len,
                }
            }
            None => Self {
                mem: Mem::Heap(vec![0; len]),
                len,
            },
        }
    }

    /// Bytes it can hold without a new allocation.
    fn capacity(&self) -> usize {
        match &self.mem {
            Mem::Map(m, start) => m.len().saturating_sub(*start),
            Mem::Heap(v) => v.len(),
        }
    }
}

impl Deref for HugeBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let all: &[u8] = match &self.mem {
            Mem::Map(m, start) => m.get(*start..).unwrap_or_default(),
            Mem::Heap(v) => v,
        };
        all.get(..self.len).unwrap_or_default()
    }
}

impl DerefMut for HugeBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let all: &mut [u8] = match &mut self.mem {
            Mem::Map(m, start) => m.get_mut(*start..).unwrap_or_default(),
            Mem::Heap(v) => v,
        };
        all.get_mut(..self.len).unwrap_or_default()
    }
}

impl std::fmt::Debug for HugeBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBuf({} bytes)", self.len)
    }
}

/// A bounded stack of spare [`HugeBuf`]s.
#[derive(Debug)]
pub(crate) struct HugePool {
    free: Mutex<Vec<HugeBuf>>,
    /// At most this many spare buffers are kept.
    keep: usize,
}

impl HugePool {
    pub(crate) fn new(keep: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A pooled copy of `bytes`.
    pub(crate) fn copy_of(&self, bytes: &[u8]) -> Result<HugeBuf> {
        let n = bytes.len();
        let spare = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut b = match spare {
            Some(mut b) if b.capacity() >= n => {
                b.len = n;
                b
            }
            _ => HugeBuf::new(n),
        };
        b.get_mut(..n)
            .ok_or(Error::invalid("write too large to copy"))?
            .copy_from_slice(bytes);
        Ok(b)
    }

    /// Returns a buffer for reuse.
    pub(crate) fn put(&self, buf: HugeBuf) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_reuse_and_alignment() {
        let p = HugePool::new(1);
        let a = p.copy_of(&[7; 5000]).unwrap();
        assert_eq!(&a[..], &[7; 5000]);
        if let Mem::Map(..) = a.mem {
            assert_eq!(a.as_ptr() as usize % HUGE, 0);
        }
        p.put(a);
        let b = p.copy_of(&[1, 2, 3]).unwrap();
        assert_eq!(&b[..], &[1, 2, 3]);
        assert!(b.capacity() >= 5000, "the spare was reused");
        let big = p.copy_of(&vec![9u8; 3 << 20]).unwrap();
        assert_eq!((big.len(), big[0], big[(3 << 20) - 1]), (3 << 20, 9, 9));
        assert!(p.copy_of(&[]).unwrap().is_empty());
    }
}
