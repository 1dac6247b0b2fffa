//! What qemu-io's `-s` and `-C` put over an image: a temporary qcow2 overlay that takes
//! the writes (the image itself is only read), and a copy-on-read layer that writes
//! what a read fetched from the backing chain into the top image.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use diskimg::blockio::{DeviceInfo, InfoValue, ZeroFlags};

use super::blkdebug::Blkdebug;
use super::filter::{Filter, Filtered};
use diskimg::{BlockDevice, Format, Image, ImageOptions, OptionList, Result};

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
/// zero writes), so the data is read from the top image from then on (its block device
/// is `Filtered<CopyOnRead>`).
#[derive(Debug)]
pub(super) struct CopyOnRead {
    inner: Arc<dyn BlockDevice>,
    /// The blkdebug node `inner` is (qemu raises `cor_write` on it), if any.
    debug: Option<Arc<Filtered<Blkdebug>>>,
}

/// The granularity qemu copies in: the subcluster with extended L2 entries, else the
/// cluster (512 bytes for formats without clusters).
fn copy_unit(info: &DeviceInfo) -> u64 {
    let cluster = info.cluster_size.unwrap_or(512).max(512);
    let extl2 = info.format_specific.as_ref().is_some_and(|(_, kv)| {
        kv.iter()
            .any(|(k, v)| k == "extended-l2" && matches!(v, InfoValue::Bool(true)))
    });
    if extl2 {
        (cluster / 32).max(512)
    } else {
        cluster
    }
}

impl CopyOnRead {
    /// Wraps `inner` (which must be writable); `debug` is the blkdebug node it is.
    pub(super) fn new(inner: Arc<dyn BlockDevice>, debug: Option<Arc<Filtered<Blkdebug>>>) -> Self {
        Self { inner, debug }
    }

    /// Reads `buf` at `offset` as qemu's `bdrv_co_do_copy_on_readv`: over the range
    /// widened to whole (sub)clusters, extent by extent in order, allocated parts are
    /// read as they are; the unallocated parts (left to the backing chain, or to nothing)
    /// are read, `cor_write` is raised, and they are written into the top image (as zero
    /// writes where they read zeroes: qemu's copy-on-read allocates them even without a
    /// backing file) before their bytes are handed out.
    fn read_copying(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        let unit = copy_unit(&self.inner.info());
        let mut pos = offset - offset % unit;
        let stop = end.next_multiple_of(unit).min(self.inner.virtual_size());
        while pos < stop {
            let e = self.inner.map(pos, stop - pos)?;
            let n = e.len.clamp(1, stop - pos);
            // The part of `buf` this extent covers.
            let (a, b) = (pos.max(offset), (pos + n).min(end));
            let part = |buf: &mut [u8]| -> Option<std::ops::Range<usize>> {
                let r = usize::try_from(a - offset).ok()?..usize::try_from(b - offset).ok()?;
                (a < b && r.end <= buf.len()).then_some(r)
            };
            if !e.kind.is_present() {
                self.copy_up(pos, n, buf, offset)?;
            } else if let Some(dst) = part(buf).and_then(|r| buf.get_mut(r)) {
                self.inner.read_at(dst, a)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Copies `pos..pos+len` up into the top image, filling what of it `buf` (at
    /// `offset`) covers.
    fn copy_up(&self, pos: u64, len: u64, buf: &mut [u8], offset: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut done = 0;
        while done < len {
            let at = pos + done;
            let n = (len - done).min(CHUNK);
            let mut chunk = vec![0u8; usize::try_from(n).unwrap_or(0)];
            self.inner.read_at(&mut chunk, at)?;
            if let Some(d) = &self.debug {
                d.event(diskimg::blockio::DebugEvent::CorWrite);
            }
            if chunk.iter().all(|&b| b == 0) {
                self.inner.write_zeroes(at, n, ZeroFlags::default())?;
            } else {
                self.inner.write_at(&chunk, at)?;
            }
            // Hand out the overlap of `at..at+n` with the caller's range.
            let (a, b) = (at.max(offset), (at + n).min(offset + buf.len() as u64));
            if a < b {
                let src = chunk.get(
                    usize::try_from(a - at).unwrap_or(0)..usize::try_from(b - at).unwrap_or(0),
                );
                let dst = buf.get_mut(
                    usize::try_from(a - offset).unwrap_or(0)
                        ..usize::try_from(b - offset).unwrap_or(0),
                );
                if let (Some(src), Some(dst)) = (src, dst) {
                    dst.copy_from_slice(src);
                }
            }
            done += n;
        }
        Ok(())
    }
}

impl Filter for CopyOnRead {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_copying(buf, offset)
    }
}

/// qemu's `compress` filter: every write goes to the image compressed, widened to whole
/// compression units (the parts of the units around the request are read first, as
/// qemu's block layer pads requests to the filter's alignment). As in qemu, a unit that
/// is already allocated cannot be written compressed (EIO). Its block device is
/// `Filtered<Compress>`.
#[derive(Debug)]
pub(super) struct Compress {
    inner: Arc<dyn BlockDevice>,
}

impl Compress {
    /// Compresses the writes to `inner`.
    pub(super) fn new(inner: Arc<dyn BlockDevice>) -> Self {
        Self { inner }
    }
}

impl Filter for Compress {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let unsupported = || diskimg::Error::unsupported("compress", "compressed writes");
        let unit = self
            .inner
            .compressed_write_granularity()
            .ok_or_else(unsupported)?;
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(unsupported)?;
        let start = offset - offset % unit.max(1);
        let stop = end
            .next_multiple_of(unit.max(1))
            .min(self.inner.virtual_size());
        let mut pos = start;
        while pos < stop {
            let e = self.inner.map(pos, stop - pos)?;
            if e.kind.is_present() {
                return Err(std::io::Error::from_raw_os_error(5).into());
            }
            pos += e.len.max(1);
        }
        let mut whole = vec![0u8; usize::try_from(stop - start).map_err(|_| unsupported())?];
        if start < offset || stop > end {
            self.inner.read_at(&mut whole, start)?;
        }
        let at = usize::try_from(offset - start).map_err(|_| unsupported())?;
        if let Some(dst) = whole.get_mut(at..at + buf.len()) {
            dst.copy_from_slice(buf);
        }
        self.inner.write_compressed(&whole, start)
    }
}
