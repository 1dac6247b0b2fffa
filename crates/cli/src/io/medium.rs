//! What a fatal corruption event leaves of an image in qemu-io: qemu's
//! `qcow2_signal_corruption` marks a read-write image corrupt and takes its driver away
//! (`bs->drv = NULL`), so every later request fails with `ENOMEDIUM` (`read failed: No
//! medium found`) while the request that met the corruption failed with `EIO`; a flush
//! has nothing left to do. [`Medium`] is that filter over a writable image.

use std::sync::Arc;

use diskimg::blockio::{Extent, ZeroFlags};
use diskimg::{BlockDevice, Error, Result};

use super::filter::Filter;

/// The fatal corruption events reported when a writable image was opened
/// ([`crate::errmap::fatal_events`]): one more, and the image is gone.
#[derive(Clone, Copy, Debug)]
pub(super) struct OpenedAt(u64);

impl OpenedAt {
    /// The count now.
    pub(super) fn now() -> Self {
        Self(crate::errmap::fatal_events())
    }

    /// True after a fatal corruption event since the open: qemu's node has no driver
    /// left.
    pub(super) fn gone(self) -> bool {
        crate::errmap::fatal_events() != self.0
    }
}

/// The filter: requests pass until a fatal corruption event after the image's open.
#[derive(Debug)]
pub(super) struct Medium {
    inner: Arc<dyn BlockDevice>,
    opened: OpenedAt,
}

impl Medium {
    pub(super) fn new(inner: Arc<dyn BlockDevice>, opened: OpenedAt) -> Self {
        Self { inner, opened }
    }

    /// `Err(ENOMEDIUM)` once the image met a fatal corruption event.
    fn present(&self) -> Result<()> {
        if !self.opened.gone() {
            return Ok(());
        }
        Err(Error::io(
            "the image was marked corrupt",
            std::io::Error::from_raw_os_error(super::session::ENOMEDIUM),
        ))
    }
}

impl Filter for Medium {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        self.present()?;
        self.inner.map(offset, len)
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.present()?;
        self.inner.read_at(buf, offset)
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.present()?;
        self.inner.write_at(buf, offset)
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.present()?;
        self.inner.write_compressed(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.present()?;
        self.inner.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.present()?;
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        // qemu's flush of a node without a driver succeeds.
        match self.present() {
            Ok(()) => self.inner.flush(),
            Err(_) => Ok(()),
        }
    }
}
