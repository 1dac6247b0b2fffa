//! Raw disk images: the guest bytes are the host bytes.
//!
//! [`RawDevice`] implements [`BlockDevice`] over any [`Storage`]; [`map`](BlockDevice::map)
//! reports holes from `SEEK_DATA`/`SEEK_HOLE` (as zero extents), so converting a sparse
//! raw image stays sparse. [`DRIVER`] creates images with `preallocation=off|falloc|full`
//! ([`RawCreateOptions`], the typed form of those options).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions,
//!                       OptionList, Storage};
//!
//! let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! let mut req = CreateRequest::new(1 << 20, OptionList::new());
//! diskimg_raw::DRIVER.create(storage.clone(), &mut req)?;
//! let dev = diskimg_raw::DRIVER.open(storage, &OpenOptions::new())?;
//! dev.write_at(&[0xab; 512], 4096)?;
//! let mut buf = [0u8; 512];
//! dev.read_at(&mut buf, 4096)?;
//! assert_eq!(buf, [0xab; 512]);
//! assert_eq!(dev.info().virtual_size, 1 << 20);
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```

mod options;

pub use options::RawCreateOptions;

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use diskimg_blockio::{
    BlockDevice, CreateOptionSpec, CreateRequest, DeviceInfo, Driver, Error, Extent, Holes,
    HostRun, Layout, Mapping, OpenOptions, PastEof, Preallocation, Result, Storage, ZeroFlags,
    check_range, copy_range, map_via, read_via,
};

/// The raw driver for the facade's table. Its probe never claims a file: raw is the
/// fallback when nothing else matches.
pub static DRIVER: RawDriver = RawDriver;

/// Probe, open and create for raw images.
#[derive(Debug)]
pub struct RawDriver;

static CREATE_OPTIONS: &[CreateOptionSpec] = &[CreateOptionSpec {
    name: "size",
    kind: "<size>",
    help: "Virtual disk size",
}];

impl Driver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn probe(&self, _storage: &dyn Storage) -> u32 {
        0
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(RawDevice::new(storage, options.read_only)?))
    }

    /// [`RawCreateOptions::take`] from `request.options`, then
    /// [`RawCreateOptions::create`].
    fn create(&self, storage: Arc<dyn Storage>, request: &mut CreateRequest) -> Result<()> {
        RawCreateOptions::take(&mut request.options)?.create(storage.as_ref(), request)
    }

    fn create_options(&self) -> &'static [CreateOptionSpec] {
        CREATE_OPTIONS
    }
}

/// A raw image: guest offset = host offset.
#[derive(Debug)]
pub struct RawDevice {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    read_only: bool,
    closed: diskimg_blockio::Closed,
}

impl RawDevice {
    /// Opens `storage` as a raw disk of its current length rounded up to a whole
    /// 512-byte sector, as qemu does (the partial tail sector reads as zeroes).
    pub fn new(storage: Arc<dyn Storage>, read_only: bool) -> Result<Self> {
        let size = storage.len()?.div_ceil(512).saturating_mul(512);
        Ok(Self {
            read_only: read_only || storage.is_read_only(),
            storage,
            size: AtomicU64::new(size),
            closed: diskimg_blockio::Closed::new(),
        })
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            self.closed.check()
        }
    }
}

/// Guest offset = host offset: one host run, whose holes map as zeroes and whose bytes
/// past the end of an odd-sized file (a size rounded up to a sector) read as zeroes.
impl Layout for RawDevice {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn lookup(&self, offset: u64, max: u64) -> Result<(Mapping<'_>, u64)> {
        let run = HostRun::new(self.storage.as_ref(), offset)
            .past_eof(PastEof::Zero)
            .holes(Holes::Zero);
        Ok((Mapping::Host(run), max))
    }
}

impl BlockDevice for RawDevice {
    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new("raw", self.virtual_size());
        info.read_only = self.read_only;
        info
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_via(self, buf, offset)
    }

    fn walk_runs(&self, offset: u64, len: u64, f: &mut diskimg_blockio::RunFn<'_>) -> Result<bool> {
        diskimg_blockio::walk(self, offset, len, f)
    }

    /// Never moves: guest byte `x` always lives at host byte `x` (plus the fixed
    /// `offset` option); a discard punches a hole the same guest range reads as zeroes.
    fn host_epoch(&self) -> Option<u64> {
        Some(0)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.virtual_size())?;
        self.storage.write_all_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [std::io::IoSliceMut<'_>], offset: u64) -> Result<()> {
        let size = self.virtual_size();
        let len = diskimg_blockio::vectored::total_len(bufs.iter().map(|b| b.len()), offset)?;
        check_range(offset, len, size)?;
        // As read_at: only the last sector can lie beyond the end of an odd-sized file.
        if offset + len <= size.saturating_sub(512) {
            return self.storage.read_vectored_exact_at(bufs, offset);
        }
        diskimg_blockio::vectored::read_each(self, bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[std::io::IoSlice<'_>], offset: u64) -> Result<()> {
        let len = diskimg_blockio::vectored::total_len(bufs.iter().map(|b| b.len()), offset)?;
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        self.storage.write_vectored_all_at(bufs, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        // As qemu's raw driver, which passes `BDRV_REQ_MAY_UNMAP` down: a file gets a
        // hole punched.
        if flags.may_unmap {
            return self.storage.write_zeroes_unmap(offset, len);
        }
        self.storage.write_zeroes(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        self.storage.discard(offset, len)
    }

    fn close(&self) -> Result<()> {
        // One shared meaning (blockio::Closed): later writes are refused, a second
        // close does nothing.
        self.closed.close_with(self.read_only, || self.flush())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage.flush()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        map_via(self, offset, len)
    }

    /// Guest offset = host offset: the layout is the file's.
    fn fixed_layout(&self) -> bool {
        true
    }

    /// Guest offset = host offset in the raw storage.
    fn data_storage(&self) -> Option<Arc<dyn Storage>> {
        Some(self.storage.clone())
    }

    /// [`copy_range`] into the storage (`copy_file_range` between host files).
    fn write_from(&self, offset: u64, len: u64, src: &dyn Storage, src_offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        copy_range(src, src_offset, self.storage.as_ref(), offset, len)
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation, shrink: bool) -> Result<()> {
        self.writable()?;
        let old = self.virtual_size();
        if new_size < old && !shrink {
            return Err(Error::invalid(
                "Use the --shrink option to perform a shrink operation.",
            ));
        }
        if new_size < old && prealloc != Preallocation::Off {
            return Err(Error::invalid(
                "Preallocation can only be used for growing images",
            ));
        }
        if new_size > old {
            if prealloc == Preallocation::Metadata {
                return Err(Error::invalid(
                    "Unsupported preallocation mode 'metadata' for raw",
                ));
            }
            self.storage.preallocate(old, new_size - old, prealloc)?;
        }
        self.storage.set_len(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskimg_blockio::{ExtentKind, FileStorage, MemStorage, OptionList, map_all};

    #[test]
    fn out_of_range_and_read_only() {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![0; 1024]));
        let d = RawDevice::new(s.clone(), true).unwrap();
        assert!(matches!(d.write_at(&[1], 0), Err(Error::ReadOnly)));
        let mut b = [0u8; 2];
        assert!(matches!(
            d.read_at(&mut b, 1023),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn map_of_a_file_not_a_sector_multiple() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.img");
        std::fs::write(&path, vec![3u8; 1000]).unwrap();
        let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&path, true).unwrap());
        let d = DRIVER.open(s, &OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(d.virtual_size(), 1024);
        let ext = map_all(d.as_ref(), 0, 1024).unwrap();
        let data = ExtentKind::Data { offset: Some(0) };
        let tail = ExtentKind::Zero { offset: Some(1000) };
        let kinds: Vec<_> = ext.iter().map(|e| (e.offset, e.len, e.kind)).collect();
        assert_eq!(kinds, vec![(0, 1000, data), (1000, 24, tail)]);
        let mut buf = [9u8; 1024];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1000].iter().all(|&b| b == 3) && buf[1000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn map_reports_holes_in_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let s: Arc<dyn Storage> = Arc::new(FileStorage::create(&path).unwrap());
        let mut req = CreateRequest::new(8 << 20, OptionList::new());
        DRIVER.create(s.clone(), &mut req).unwrap();
        let d = DRIVER.open(s, &OpenOptions::new()).unwrap();
        d.write_at(&[1u8; 65536], 1 << 20).unwrap();
        let ext = map_all(d.as_ref(), 0, 8 << 20).unwrap();
        let data: u64 = ext
            .iter()
            .filter(|e| matches!(e.kind, ExtentKind::Data { .. }))
            .map(|e| e.len)
            .sum();
        assert!((65536..8 << 20).contains(&data), "{ext:?}");
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 8 << 20);
    }

    #[test]
    fn odd_sized_files_round_up_to_a_sector_with_a_zero_tail() {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![7; 1000]));
        let d = RawDevice::new(s, true).unwrap();
        assert_eq!(d.virtual_size(), 1024);
        let mut b = [1u8; 48];
        d.read_at(&mut b, 976).unwrap();
        assert!(b[..24].iter().all(|&x| x == 7));
        assert!(b[24..].iter().all(|&x| x == 0));
        let ext = map_all(&d, 0, 1024).unwrap();
        assert_eq!(ext.len(), 2, "{ext:?}");
        assert_eq!(ext[1].offset, 1000);
        assert!(ext[1].kind.is_zero());
    }

    #[test]
    fn resize_needs_shrink_flag() {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![0; 1024]));
        let d = RawDevice::new(s, false).unwrap();
        assert!(d.resize(512, Preallocation::Off, false).is_err());
        d.resize(512, Preallocation::Off, true).unwrap();
        assert_eq!(d.virtual_size(), 512);
        d.resize(4096, Preallocation::Full, false).unwrap();
        assert_eq!(d.virtual_size(), 4096);
        // Preallocation describes new space: a shrink with it is refused (issue 15.7).
        let e = d.resize(1024, Preallocation::Falloc, true).unwrap_err();
        assert!(e.to_string().contains("only be used for growing"), "{e}");
        assert_eq!(d.virtual_size(), 4096);
    }
}
