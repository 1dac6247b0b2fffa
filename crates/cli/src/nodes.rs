//! Block nodes the CLI builds itself for qemu-style image specifications: qemu's
//! `null-co` device (reads zeroes, discards writes) and a format opened on top of another
//! format (`driver=qcow2,file.driver=qcow2,…`, qemu's nested images), which needs the
//! inner device as the outer one's storage.

use std::any::Any;
use std::sync::Arc;

use diskimg::blockio::{DeviceInfo, Extent, ExtentKind, ZeroFlags, check_range};
use diskimg::{BlockDevice, Error, Result, Storage};

/// qemu's `null-co` driver: `size` bytes that read as zeroes; writes are accepted and
/// dropped.
#[derive(Debug)]
pub(crate) struct NullDevice {
    size: u64,
}

impl NullDevice {
    /// A null device of `size` bytes.
    pub(crate) fn new(size: u64) -> Self {
        Self { size }
    }
}

impl BlockDevice for NullDevice {
    fn info(&self) -> DeviceInfo {
        let mut i = diskimg::blockio::DeviceInfo::new("null-co", self.size);
        i.read_only = false;
        i
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        check_range(offset, len, self.size)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        Ok(Extent {
            offset,
            len,
            kind: ExtentKind::Zero { offset: None },
        })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A block device used as the storage of another format (qemu's format-on-format
/// nesting): its guest bytes are the outer format's host bytes.
#[derive(Debug)]
pub(crate) struct DeviceStorage {
    dev: Arc<dyn BlockDevice>,
}

impl DeviceStorage {
    /// The guest view of `dev` as storage.
    pub(crate) fn new(dev: Arc<dyn BlockDevice>) -> Self {
        Self { dev }
    }
}

impl Storage for DeviceStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::invalid("write range overflows"))?;
        if end > self.dev.virtual_size() {
            self.set_len(end)?;
        }
        self.dev.write_at(buf, offset)
    }
    fn len(&self) -> Result<u64> {
        Ok(self.dev.virtual_size())
    }
    fn set_len(&self, len: u64) -> Result<()> {
        let shrink = len < self.dev.virtual_size();
        self.dev
            .resize(len, diskimg::blockio::Preallocation::Off, shrink)
    }
    fn flush(&self) -> Result<()> {
        self.dev.flush()
    }
    fn is_read_only(&self) -> bool {
        self.dev.info().read_only
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.dev.write_zeroes(offset, len, ZeroFlags::default())
    }
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.dev
            .write_zeroes(offset, len, ZeroFlags { may_unmap: true })
    }
}

/// qemu's raw format with `offset`/`size` options: the guest sees `size` bytes of
/// `inner` from `offset` on (a partition inside a file); requests past the window fail.
#[derive(Debug)]
pub(crate) struct RawWindow {
    inner: Arc<dyn BlockDevice>,
    offset: u64,
    size: u64,
}

impl RawWindow {
    /// The window `offset..offset+size` of `inner` (`size`: to its end when `None`), as
    /// qemu checks it (`offset`/`size` must lie inside the file).
    pub(crate) fn new(
        inner: Arc<dyn BlockDevice>,
        offset: u64,
        size: Option<u64>,
    ) -> anyhow::Result<Self> {
        let len = inner.virtual_size();
        if offset > len {
            anyhow::bail!(
                "The sum of offset ({offset}) and size (0) has to be smaller or equal to the  actual size of the containing file ({len})"
            );
        }
        let size = size.unwrap_or(len - offset);
        if offset.checked_add(size).is_none_or(|end| end > len) {
            anyhow::bail!(
                "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({len})"
            );
        }
        Ok(Self {
            inner,
            offset,
            size,
        })
    }

    /// The inner offset of a request of `len` bytes at `offset`, when inside the window.
    fn at(&self, offset: u64, len: u64) -> Result<u64> {
        check_range(offset, len, self.size)?;
        Ok(self.offset + offset)
    }
}

impl crate::io::filter::Filter for RawWindow {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    fn info(&self) -> DeviceInfo {
        let mut i = self.inner.info();
        i.virtual_size = self.size;
        i
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let e = self.inner.map(self.at(offset, len)?, len)?;
        Ok(Extent {
            offset: e.offset - self.offset,
            len: e.len.min(len),
            kind: e.kind,
        })
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, self.at(offset, buf.len() as u64)?)
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, self.at(offset, buf.len() as u64)?)
    }
    fn write_compressed(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::unsupported("raw", "compressed writes"))
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(self.at(offset, len)?, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(self.at(offset, len)?, len)
    }
}
