//! Filter nodes over an opened image (qemu's `blkdebug` and `copy-on-read`): a [`Filter`]
//! says what it does to the requests it takes, [`Filtered`] is its block device, which
//! hands every other request, and every query, to the inner device unchanged.

use std::any::Any;
use std::sync::Arc;

use diskimg::blockio::{
    Amend, Bitmaps, ChainLink, CheckReport, DeviceInfo, Extent, Preallocation, RepairMode,
    Snapshots, ZeroFlags,
};
use diskimg::{BlockDevice, Result, Storage};

/// A filter's own part: each request method defaults to the inner device's.
pub(crate) trait Filter: std::fmt::Debug + Send + Sync + 'static {
    /// The device below the filter.
    fn inner(&self) -> &Arc<dyn BlockDevice>;
    /// What the device is (the inner device's description).
    fn info(&self) -> DeviceInfo {
        self.inner().info()
    }
    /// Where a range's data is.
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner().map(offset, len)
    }
    /// A guest read.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner().read_at(buf, offset)
    }
    /// A guest write.
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner().write_at(buf, offset)
    }
    /// A compressed write.
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner().write_compressed(buf, offset)
    }
    /// A zero write.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner().write_zeroes(offset, len, flags)
    }
    /// A discard.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner().discard(offset, len)
    }
    /// A flush.
    fn flush(&self) -> Result<()> {
        self.inner().flush()
    }
}

/// The block device of filter `F`.
#[derive(Debug)]
pub(crate) struct Filtered<F>(pub(crate) F);

impl<F> std::ops::Deref for Filtered<F> {
    type Target = F;
    fn deref(&self) -> &F {
        &self.0
    }
}

impl<F: Filter> BlockDevice for Filtered<F> {
    fn info(&self) -> DeviceInfo {
        self.0.info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.0.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.0.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
    fn close(&self) -> Result<()> {
        self.0.inner().close()
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        self.0.map(offset, len)
    }
    fn compressed_write_granularity(&self) -> Option<u64> {
        self.0.inner().compressed_write_granularity()
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_compressed(buf, offset)
    }
    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) -> Result<()> {
        self.0.inner().set_backing(backing)
    }
    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.0.inner().backing_device()
    }
    fn resize(&self, new_size: u64, prealloc: Preallocation, shrink: bool) -> Result<()> {
        self.0.inner().resize(new_size, prealloc, shrink)
    }
    fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        self.0.inner().check(repair)
    }
    /// None: requests must pass the filter, never go to the host bytes directly.
    fn data_storage(&self) -> Option<Arc<dyn Storage>> {
        None
    }
    fn repaired_at_open(&self) -> Vec<String> {
        self.0.inner().repaired_at_open()
    }
    fn as_snapshots(&self) -> Option<&dyn Snapshots> {
        self.0.inner().as_snapshots()
    }
    fn as_bitmaps(&self) -> Option<&dyn Bitmaps> {
        self.0.inner().as_bitmaps()
    }
    fn as_amend(&self) -> Option<&dyn Amend> {
        self.0.inner().as_amend()
    }
    fn as_chain_link(&self) -> Option<&dyn ChainLink> {
        self.0.inner().as_chain_link()
    }
    fn as_any(&self) -> &dyn Any {
        self.0.inner().as_any()
    }
}
