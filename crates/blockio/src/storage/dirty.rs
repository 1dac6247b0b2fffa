//! Partial blocks written under `O_DIRECT` in cache mode `none`, kept until the next
//! flush.
//!
//! Format drivers update their metadata a few bytes at a time (a qcow2 refcount is two
//! bytes, an L2 entry eight). With `O_DIRECT` each such write is a read-modify-write of a
//! whole block: two synchronous device round trips. On the larger-than-page-cache
//! benchmark (docs/benchmarks.md) these small requests took as long as the 2 MiB data
//! writes between them. Cache mode `none` promises nothing about a write until the next
//! flush (qemu reports a volatile write cache to the guest), so the partial blocks are
//! kept here, read from the device once, and written back together at the next flush,
//! when too many have gathered, or when the storage is dropped. `directsync` writes
//! every request through, as before.
//!
//! [`DirectIo`](super::direct::DirectIo) keeps the cache coherent: reads overlay it,
//! aligned writes update the blocks it holds, and the file operations that bypass it
//! (`fallocate`, truncation, `SEEK_DATA`) write it back first.

use std::collections::BTreeMap;
use std::io;

/// Most bytes of blocks kept before they are written back.
const MAX_BYTES: usize = 1 << 20;

/// Dirty blocks by their (aligned) offset; every block is `align` bytes.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    blocks: BTreeMap<u64, Vec<u8>>,
}

impl Dirty {
    pub(crate) fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// True once the blocks of `align` bytes should be written back.
    pub(crate) fn is_full(&self, align: usize) -> bool {
        self.blocks.len().saturating_mul(align) >= MAX_BYTES
    }

    /// The cached block at `off`, if any.
    pub(crate) fn get_mut(&mut self, off: u64) -> Option<&mut Vec<u8>> {
        self.blocks.get_mut(&off)
    }

    /// Caches `block` (the whole block at `off`, made dirty).
    pub(crate) fn insert(&mut self, off: u64, block: Vec<u8>) {
        self.blocks.insert(off, block);
    }

    /// Whether a cached block holds any byte of `off..off + len`.
    pub(crate) fn overlaps(&self, off: u64, len: u64, align: usize) -> bool {
        let end = off.saturating_add(len);
        self.blocks
            .range(off / align as u64 * align as u64..end)
            .any(|(&bo, b)| bo.saturating_add(b.len() as u64) > off)
    }

    /// Copies the cached bytes inside `off..off + buf.len()` into `buf` (a read).
    pub(crate) fn overlay(&self, buf: &mut [u8], off: u64, align: usize) {
        let end = off.saturating_add(buf.len() as u64);
        for (&bo, block) in self.blocks.range(off / align as u64 * align as u64..end) {
            let (lo, hi) = (bo.max(off), (bo + block.len() as u64).min(end));
            if let (Some(dst), Some(src)) = (
                buf.get_mut(idx(lo - off)..idx(hi - off)),
                block.get(idx(lo - bo)..idx(hi - bo)),
            ) {
                dst.copy_from_slice(src);
            }
        }
    }

    /// Copies `data` (written at `off`) into the cached blocks it overlaps.
    pub(crate) fn update(&mut self, data: &[u8], off: u64, align: usize) {
        let end = off.saturating_add(data.len() as u64);
        for (&bo, block) in self
            .blocks
            .range_mut(off / align as u64 * align as u64..end)
        {
            let (lo, hi) = (bo.max(off), (bo + block.len() as u64).min(end));
            if let (Some(dst), Some(src)) = (
                block.get_mut(idx(lo - bo)..idx(hi - bo)),
                data.get(idx(lo - off)..idx(hi - off)),
            ) {
                dst.copy_from_slice(src);
            }
        }
    }

    /// Writes every block with `write(bytes, offset)`, runs of consecutive blocks
    /// (up to `max_run` bytes) in one call through `scratch`, then forgets them. On an
    /// error the blocks stay cached.
    pub(crate) fn write_back(
        &mut self,
        scratch: &mut [u8],
        mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut run: Option<(u64, usize)> = None;
        for (&off, block) in &self.blocks {
            let n = block.len();
            match run {
                Some((start, used)) if start + used as u64 == off && used + n <= scratch.len() => {
                    copy_into(scratch, used, block);
                    run = Some((start, used + n));
                }
                _ => {
                    if let Some((start, used)) = run {
                        write(scratch.get(..used).unwrap_or_default(), start)?;
                    }
                    copy_into(scratch, 0, block);
                    run = Some((off, n));
                }
            }
        }
        if let Some((start, used)) = run {
            write(scratch.get(..used).unwrap_or_default(), start)?;
        }
        self.blocks.clear();
        Ok(())
    }
}

fn copy_into(scratch: &mut [u8], at: usize, block: &[u8]) {
    if let Some(dst) = scratch.get_mut(at..at + block.len()) {
        dst.copy_from_slice(block);
    }
}

fn idx(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_update_and_coalesced_write_back() {
        let mut d = Dirty::default();
        assert!(d.is_empty());
        d.insert(512, vec![1; 512]);
        d.insert(1024, vec![2; 512]);
        d.insert(4096, vec![3; 512]);
        // A read of 300..1300 sees the cached bytes from 512 on.
        let mut buf = vec![9u8; 1000];
        d.overlay(&mut buf, 300, 512);
        assert!(buf[..212].iter().all(|&b| b == 9));
        assert!(buf[212..724].iter().all(|&b| b == 1));
        assert!(buf[724..].iter().all(|&b| b == 2));
        // An aligned write over 1024..1536 updates the block it covers.
        d.update(&[7; 512], 1024, 512);
        assert_eq!(d.get_mut(1024).map(|b| b[0]), Some(7));
        let mut writes = Vec::new();
        let mut scratch = vec![0u8; 1024];
        d.write_back(&mut scratch, |b, o| {
            writes.push((o, b.len(), b[0], b[b.len() - 1]));
            Ok(())
        })
        .unwrap();
        // 512..1536 coalesced, 4096 on its own.
        assert_eq!(writes, vec![(512, 1024, 1, 7), (4096, 512, 3, 3)]);
        assert!(d.is_empty());
        assert!(!d.is_full(512));
    }

    #[test]
    fn failed_write_back_keeps_the_blocks() {
        let mut d = Dirty::default();
        d.insert(0, vec![1; 512]);
        let mut scratch = vec![0u8; 512];
        let r = d.write_back(&mut scratch, |_, _| Err(io::Error::other("EIO")));
        assert!(r.is_err());
        assert!(!d.is_empty());
    }
}
