//! qemu's `cache=unsafe` for a conversion target: flushes are dropped while the image
//! is written, and the caller flushes the real storage once at the end.
//!
//! Format drivers flush between data and metadata writes so that a crash never leaves
//! metadata pointing at unwritten data. While `qemu-img convert` writes a new image it
//! uses `cache=unsafe` (its default `-t`): a crash leaves a useless half-written target
//! anyway, so those ordering flushes only cost time (one `fdatasync` per allocated block
//! in some formats). [`UnsafeCache`] does the same for diskimg.

use std::sync::Arc;

use diskimg_blockio::{Preallocation, Result, Storage};

/// A [`Storage`] that forwards everything to `inner` except [`Storage::flush`], which
/// does nothing. Call [`UnsafeCache::flush_inner`] (or flush the inner storage) when the
/// image is complete.
#[derive(Debug)]
pub struct UnsafeCache {
    inner: Arc<dyn Storage>,
}

impl UnsafeCache {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self { inner }
    }

    /// Makes every completed write durable (the real flush).
    pub fn flush_inner(&self) -> Result<()> {
        self.inner.flush()
    }
}

impl Storage for UnsafeCache {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn is_empty(&self) -> Result<bool> {
        self.inner.is_empty()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }
    fn discard_zeroes(&self) -> bool {
        self.inner.discard_zeroes()
    }
    fn preallocate(&self, offset: u64, len: u64, mode: Preallocation) -> Result<()> {
        self.inner.preallocate(offset, len, mode)
    }
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> Result<u64> {
        self.inner.next_hole(offset)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.inner.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskimg_blockio::{CrashMode, FaultStorage};

    #[test]
    fn flushes_are_dropped_until_flush_inner() {
        let fault = Arc::new(FaultStorage::new(Vec::new(), None));
        let s = UnsafeCache::new(fault.clone());
        s.write_all_at(&[7; 512], 0).unwrap();
        s.flush().unwrap();
        // Nothing was made durable: a crash loses the write.
        let lost = fault.crash_image(CrashMode::DropUnflushed);
        assert!(lost.iter().all(|&b| b == 0));
        s.flush_inner().unwrap();
        let kept = fault.crash_image(CrashMode::DropUnflushed);
        assert_eq!(kept.get(..512), Some(&[7u8; 512][..]));
        assert_eq!(s.len().ok(), Some(512));
    }
}
