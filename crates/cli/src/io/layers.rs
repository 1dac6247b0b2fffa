//! What qemu-io's `-s` and `-C` put over an image: a temporary qcow2 overlay that takes
//! the writes (the image itself is only read), and a copy-on-read layer that writes
//! what a read fetched from the backing chain into the top image.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use diskimg::blockio::{
    Amend, Bitmaps, ChainLink, CheckReport, DeviceInfo, Extent, ExtentKind, Preallocation,
    RepairMode, Snapshots, ZeroFlags,
};
use diskimg::{BlockDevice, Format, Image, ImageOptions, OptionList, Result, Storage};

/// A qcow2 overlay in an unlinked temporary file with `img` as its backing device (qemu's
/// `BDRV_O_SNAPSHOT`): writes land in the overlay and vanish with it.
pub(super) fn snapshot_overlay(img: &Image) -> anyhow::Result<Arc<dyn BlockDevice>> {
    static N: AtomicU32 = AtomicU32::new(0);
    let size = img.device.virtual_size().next_multiple_of(512);
    let path = std::env::temp_dir().join(format!(
        "diskimg-io-snapshot-{}-{}.qcow2",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let opts = ImageOptions::default();
    diskimg::create(&path, Format::Qcow2, Some(size), OptionList::new(), &opts)?;
    let overlay = diskimg::open(&path, Some(Format::Qcow2), &opts);
    // The open file stays usable; nothing is left behind.
    let _ = std::fs::remove_file(&path);
    let overlay = overlay?;
    overlay.device.set_backing(Some(img.device.clone()))?;
    Ok(overlay.device)
}

/// Copy-on-read (qemu's `-C` / `copy-on-read` filter): before a read, the clusters of the
/// range that the top image leaves to its backing chain are copied into it (zeroes as
/// zero writes), so the data is read from the top image from then on.
#[derive(Debug)]
pub(super) struct CopyOnRead {
    inner: Arc<dyn BlockDevice>,
}

impl CopyOnRead {
    /// Wraps `inner` (which must be writable).
    pub(super) fn new(inner: Arc<dyn BlockDevice>) -> Self {
        Self { inner }
    }

    /// Copies the unallocated clusters around `offset..offset+len` up from the backing
    /// chain.
    fn populate(&self, offset: u64, len: u64) -> Result<()> {
        if self.inner.backing_device().is_none() || len == 0 {
            return Ok(());
        }
        let size = self.inner.virtual_size();
        let unit = self.inner.info().cluster_size.unwrap_or(512).max(512);
        let start = offset - offset % unit;
        let end = offset.saturating_add(len).next_multiple_of(unit).min(size);
        let mut pos = start;
        while pos < end {
            let e = self.inner.map(pos, end - pos)?;
            let n = e.len.min(end - pos);
            if e.kind == ExtentKind::Unallocated {
                self.copy_up(pos, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn copy_up(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
            self.inner.read_at(&mut buf, offset + done)?;
            if buf.iter().all(|&b| b == 0) {
                self.inner
                    .write_zeroes(offset + done, n, ZeroFlags::default())?;
            } else {
                self.inner.write_at(&buf, offset + done)?;
            }
            done += n;
        }
        Ok(())
    }
}

impl BlockDevice for CopyOnRead {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.populate(offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn close(&self) -> Result<()> {
        self.inner.close()
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.map(offset, len)
    }
    fn compressed_write_granularity(&self) -> Option<u64> {
        self.inner.compressed_write_granularity()
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_compressed(buf, offset)
    }
    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) -> Result<()> {
        self.inner.set_backing(backing)
    }
    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.inner.backing_device()
    }
    fn resize(&self, new_size: u64, prealloc: Preallocation, shrink: bool) -> Result<()> {
        self.inner.resize(new_size, prealloc, shrink)
    }
    fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        self.inner.check(repair)
    }
    fn data_storage(&self) -> Option<Arc<dyn Storage>> {
        None
    }
    fn repaired_at_open(&self) -> Vec<String> {
        self.inner.repaired_at_open()
    }
    fn as_snapshots(&self) -> Option<&dyn Snapshots> {
        self.inner.as_snapshots()
    }
    fn as_bitmaps(&self) -> Option<&dyn Bitmaps> {
        self.inner.as_bitmaps()
    }
    fn as_amend(&self) -> Option<&dyn Amend> {
        self.inner.as_amend()
    }
    fn as_chain_link(&self) -> Option<&dyn ChainLink> {
        self.inner.as_chain_link()
    }
    fn as_any(&self) -> &dyn Any {
        self.inner.as_any()
    }
}
