//! Filter nodes over an opened image (qemu's `blkdebug` and `copy-on-read`): a [`Filter`]
//! says what it does to the requests it takes, [`Filtered`] is its block device, which
//! hands every other request, and every query, to the inner device unchanged.

use std::sync::Arc;

use diskimg::blockio::{DeviceInfo, Extent, ZeroFlags, forward_device};
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
    // Every method not named here goes to the inner device: its requests are the
    // filter's (below), the vectored and copy paths route through them (the trait's
    // defaults), and the host bytes are not handed out (no walk, so no host epoch
    // either). A method added to the trait is forwarded too.
    forward_device!(inner(): all except info, virtual_size, read_at, write_at,
        read_vectored_at, walk_runs, host_epoch, write_vectored_at, write_zeroes, discard, flush, map,
        host_files, map_file, write_compressed, compress_units, write_compressed_units,
        fixed_layout, needs_compressed_writes, data_storage, write_from);
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
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        self.0.map(offset, len)
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_compressed(buf, offset)
    }
    /// None: requests must pass the filter, never go to the host bytes directly.
    fn data_storage(&self) -> Option<Arc<dyn Storage>> {
        None
    }
}
