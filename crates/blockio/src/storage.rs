//! Host storage: the bytes an image lives in.
//!
//! [`Storage`] is positional, `&self`, and `Send + Sync`: a format driver may read and write
//! it from many threads at once. Implementations here: [`FileStorage`] (a host file through
//! `pread`/`pwrite`), [`MemStorage`] (a growable in-memory buffer) and [`ReadOnlyStorage`]
//! (a wrapper refusing writes). [`crate::FaultStorage`] injects crashes for tests.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::RwLock;

use crate::cache::CacheMode;
use crate::direct::DirectIo;
use crate::error::{Error, Result};

/// How to preallocate host space when creating or growing a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Leave the file sparse.
    #[default]
    Off,
    /// Write metadata only (format-level; storage treats it as `Off`).
    Metadata,
    /// Reserve blocks with `fallocate`.
    Falloc,
    /// Write zeroes to every byte.
    Full,
}

impl Preallocation {
    /// Parses qemu's names: `off`, `metadata`, `falloc`, `full`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "metadata" => Ok(Self::Metadata),
            "falloc" => Ok(Self::Falloc),
            "full" => Ok(Self::Full),
            _ => Err(Error::invalid(format!(
                "invalid preallocation mode '{s}' (expected off, metadata, falloc or full)"
            ))),
        }
    }

    /// Parses the `file` protocol's `preallocation` create option with qemu's messages:
    /// `off`, `falloc`, `full` (`metadata`: "Unsupported preallocation mode: metadata").
    pub fn parse_file(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "falloc" => Ok(Self::Falloc),
            "full" => Ok(Self::Full),
            "metadata" => Err(Error::invalid("Unsupported preallocation mode: metadata")),
            _ => Err(Error::invalid(format!("invalid parameter value: {s}"))),
        }
    }

    /// qemu's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Metadata => "metadata",
            Self::Falloc => "falloc",
            Self::Full => "full",
        }
    }
}

/// The host bytes under an image: a file, a memory buffer, or a wrapper.
///
/// Implementors must make every method safe to call concurrently from many threads.
/// Reads past the end of the storage fail (they do **not** zero-fill: formats decide
/// what a short file means). Writes past the end grow it.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Fills every buffer, in order, from consecutive bytes at `offset` (as
    /// [`Storage::read_exact_at`] of their concatenation). Files use `preadv(2)`; the
    /// default reads each buffer.
    fn read_vectored_exact_at(
        &self,
        bufs: &mut [std::io::IoSliceMut<'_>],
        offset: u64,
    ) -> Result<()> {
        crate::vectored::storage_read_each(self, bufs, offset)
    }
    /// Writes every buffer, in order, at consecutive bytes from `offset` (as
    /// [`Storage::write_all_at`] of their concatenation). Files use `pwritev(2)`; the
    /// default writes each buffer.
    fn write_vectored_all_at(&self, bufs: &[std::io::IoSlice<'_>], offset: u64) -> Result<()> {
        crate::vectored::storage_write_each(self, bufs, offset)
    }
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// True when the length is zero.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeroes) to `len` bytes.
    fn set_len(&self, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// True when writes are refused.
    fn is_read_only(&self) -> bool {
        false
    }
    /// Makes `len` bytes at `offset` read as zeroes (growing the storage if needed).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        write_zeroes_by_buffer(self, offset, len)
    }
    /// Hints that `len` bytes at `offset` are no longer needed. Afterwards they read as
    /// zeroes if [`Storage::discard_zeroes`] is true, otherwise as unspecified data.
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// True when [`Storage::discard`] guarantees zeroes afterwards.
    fn discard_zeroes(&self) -> bool {
        false
    }
    /// Reserves or writes host space for `len` bytes at `offset` as `mode` says.
    fn preallocate(&self, offset: u64, len: u64, mode: Preallocation) -> Result<()> {
        match mode {
            Preallocation::Off | Preallocation::Metadata => {
                let end = offset
                    .checked_add(len)
                    .ok_or(Error::invalid("size overflow"))?;
                if end > self.len()? {
                    self.set_len(end)?;
                }
                Ok(())
            }
            Preallocation::Falloc | Preallocation::Full => {
                write_zeroes_by_buffer(self, offset, len)
            }
        }
    }
    /// Where the next byte range holding data begins at or after `offset`, or `None` if
    /// only holes remain. Storages that do not track holes report everything as data.
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        Ok((offset < self.len()?).then_some(offset))
    }
    /// Where the next hole begins at or after `offset` (the length when there is none).
    fn next_hole(&self, offset: u64) -> Result<u64> {
        Ok(self.len()?.max(offset))
    }
    /// Bytes actually occupied on the host (qemu's "actual-size"), if known.
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// A hint that the `len` bytes just written at `offset` will not be read again
    /// soon: the storage may start writing them back to the device now (write-behind,
    /// so that a later [`Storage::flush`] has less left to wait for) and drop them
    /// from its cache once they are clean. It makes nothing durable and reports no
    /// error; the default does nothing.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
    /// The host file holding the bytes at the same offsets, for
    /// [`copy_range`](crate::copy_range) to hand to `copy_file_range`. Only storages
    /// whose every byte is the file's byte at the same offset may return it, and only
    /// when writing to the file directly bypasses nothing but what
    /// [`Storage::start_writeback`] is told afterwards: a wrapper that injects faults,
    /// encrypts or translates offsets must return `None` (the default). Callers write to
    /// the file only when [`Storage::is_read_only`] is false.
    fn host_file(&self) -> Option<&File> {
        None
    }
}

/// Zero-fills a range with ordinary writes of at most 1 MiB.
pub fn write_zeroes_by_buffer<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zero = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(0)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let buf = zero.get(..usize::try_from(n).unwrap_or(0)).unwrap_or(&[]);
        s.write_all_at(buf, offset + done)?;
        done += n;
    }
    Ok(())
}

/// A host file accessed with positional I/O, in one of qemu's cache modes
/// ([`FileStorage::open_with`]).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    read_only: bool,
    cache: CacheMode,
    /// Alignment handling when the file is open with `O_DIRECT`.
    direct: Option<DirectIo>,
    /// The qemu-compatible lock bytes held on the file ([`FileStorage::lock`]).
    locked: std::sync::Mutex<Option<crate::lock::LockPerms>>,
}

impl FileStorage {
    /// Opens an existing file, read-write unless `read_only` (cache mode `writeback`).
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        Self::open_with(path, read_only, CacheMode::Writeback)
    }

    /// Opens an existing file in cache mode `cache`: `O_DIRECT` for `none` and
    /// `directsync` (requests are aligned here, whatever the caller passes), `O_SYNC` for
    /// `writethrough` and `directsync`, and [`Storage::flush`] doing nothing for `unsafe`.
    /// A file system that refuses `O_DIRECT` fails the open, as in qemu.
    pub fn open_with(path: impl AsRef<Path>, read_only: bool, cache: CacheMode) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(i32::try_from(cache.open_flags(read_only)).unwrap_or(0))
            .open(path)
            .map_err(|e| cache.open_error(path, e))?;
        Self::from_file_with(file, read_only, cache)
    }

    /// Wraps a file opened with the flags of `cache` ([`CacheMode::open_flags`]); with
    /// `O_DIRECT`, finds the alignment its requests need.
    pub fn from_file_with(file: File, read_only: bool, cache: CacheMode) -> Result<Self> {
        let direct = match cache.direct() {
            true => Some(DirectIo::probe(&file).map_err(|e| Error::io("O_DIRECT alignment", e))?),
            false => None,
        };
        Ok(Self {
            file,
            read_only,
            cache,
            direct,
            locked: std::sync::Mutex::new(None),
        })
    }

    /// The cache mode the file was opened in.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    #[cfg(test)]
    pub(crate) fn direct_io(&self) -> Option<&DirectIo> {
        self.direct.as_ref()
    }

    /// Creates (or truncates) a file for writing.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(format!("could not create '{}'", path.display()), e))?;
        Ok(Self::from_file(file, false))
    }

    /// Creates a file for writing as qemu does: opened without truncating, locked for
    /// creation ([`LockPerms::create`](crate::lock::LockPerms::create): a file another
    /// process uses is refused, untouched), then truncated. The lock is held until the
    /// storage is dropped or [`FileStorage::unlock`]ed; `name` names the file in errors.
    pub fn create_locked(path: impl AsRef<Path>, name: &str) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(format!("could not create '{}'", path.display()), e))?;
        let s = Self::from_file(file, false);
        s.lock(crate::lock::LockPerms::create(), name)?;
        s.file
            .set_len(0)
            .map_err(|e| Error::io(format!("could not truncate '{}'", path.display()), e))?;
        Ok(s)
    }

    /// Wraps an already open file (cache mode `writeback`).
    pub fn from_file(file: File, read_only: bool) -> Self {
        Self {
            file,
            read_only,
            cache: CacheMode::Writeback,
            direct: None,
            locked: std::sync::Mutex::new(None),
        }
    }

    /// Takes qemu's lock bytes for `perms` on the file ([`crate::lock`]), replacing the
    /// ones this storage held; fails with [`Error::Locked`] when another process's use
    /// conflicts. `name` names the file in that error.
    pub fn lock(&self, perms: crate::lock::LockPerms, name: &str) -> Result<()> {
        let mut held = self.locked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = held.take() {
            crate::lock::release(&self.file, old);
        }
        crate::lock::acquire(&self.file, perms, name)?;
        *held = Some(perms);
        Ok(())
    }

    /// Releases the lock bytes taken by [`FileStorage::lock`] (dropping the storage
    /// releases them too).
    pub fn unlock(&self) {
        let mut held = self.locked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = held.take() {
            crate::lock::release(&self.file, old);
        }
    }

    /// The lock bytes held, if any.
    pub fn lock_perms(&self) -> Option<crate::lock::LockPerms> {
        *self.locked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn seek(&self, whence: rustix::fs::SeekFrom) -> Result<Option<u64>> {
        match rustix::fs::seek(&self.file, whence) {
            Ok(pos) => Ok(Some(pos)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(Error::io("seek failed", e.into())),
        }
    }
}

impl Drop for FileStorage {
    /// Releases the lock bytes explicitly rather than leaving them to the close: a
    /// child process forked meanwhile (another thread spawning a command) shares the
    /// open file description until its `exec`, and would hold them that long.
    fn drop(&mut self) {
        self.unlock();
    }
}

impl Storage for FileStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.direct {
            Some(d) => d.read_exact(&self.file, buf, offset),
            None => self.file.read_exact_at(buf, offset),
        }
        .map_err(|e| {
            Error::io(
                format!("could not read {} bytes at offset {offset}", buf.len()),
                e,
            )
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        match &self.direct {
            Some(d) => d.write_all(&self.file, buf, offset),
            None => self.file.write_all_at(buf, offset),
        }
        .map_err(|e| {
            Error::io(
                format!("could not write {} bytes at offset {offset}", buf.len()),
                e,
            )
        })
    }

    fn read_vectored_exact_at(
        &self,
        bufs: &mut [std::io::IoSliceMut<'_>],
        offset: u64,
    ) -> Result<()> {
        if self.direct.is_some() {
            return crate::vectored::storage_read_each(self, bufs, offset);
        }
        let len = crate::vectored::total_len(bufs.iter().map(|b| b.len()), offset)?;
        crate::vectored::preadv_exact(&self.file, bufs, offset)
            .map_err(|e| Error::io(format!("could not read {len} bytes at offset {offset}"), e))
    }

    fn write_vectored_all_at(&self, bufs: &[std::io::IoSlice<'_>], offset: u64) -> Result<()> {
        self.check_writable()?;
        if self.direct.is_some() {
            return crate::vectored::storage_write_each(self, bufs, offset);
        }
        let len = crate::vectored::total_len(bufs.iter().map(|b| b.len()), offset)?;
        let mut list = bufs.to_vec();
        crate::vectored::pwritev_all(&self.file, &mut list, offset)
            .map_err(|e| Error::io(format!("could not write {len} bytes at offset {offset}"), e))
    }

    /// The file's length; for a block device (a `convert -n` target), its size.
    fn len(&self) -> Result<u64> {
        use std::os::unix::fs::FileTypeExt;
        let md = self
            .file
            .metadata()
            .map_err(|e| Error::io("could not stat file", e))?;
        if !md.file_type().is_block_device() {
            return Ok(md.len());
        }
        // Reads and writes are positional: moving the offset changes nothing else.
        self.seek(rustix::fs::SeekFrom::End(0))?
            .ok_or_else(|| Error::invalid("could not find the size of the block device"))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        self.file
            .set_len(len)
            .map_err(|e| Error::io(format!("could not resize file to {len} bytes"), e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || self.cache.ignores_flush() {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io("could not flush file", e))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(len)
            .ok_or(Error::invalid("size overflow"))?;
        let file_len = self.len()?;
        // Beyond EOF, growing the file already yields zeroes.
        if offset >= file_len {
            return self.set_len(end);
        }
        let flags = rustix::fs::FallocateFlags::ZERO_RANGE;
        if rustix::fs::fallocate(&self.file, flags, offset, len).is_ok() {
            return Ok(());
        }
        let punch = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        let in_file = len.min(file_len - offset);
        if rustix::fs::fallocate(&self.file, punch, offset, in_file).is_ok() {
            if end > file_len {
                self.set_len(end)?;
            }
            return Ok(());
        }
        write_zeroes_by_buffer(self, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let file_len = self.len()?;
        if offset >= file_len || len == 0 {
            return Ok(());
        }
        let len = len.min(file_len - offset);
        let punch = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        // Discard is a hint: a file system without hole punching keeps the data.
        let _ = rustix::fs::fallocate(&self.file, punch, offset, len);
        Ok(())
    }

    fn preallocate(&self, offset: u64, len: u64, mode: Preallocation) -> Result<()> {
        self.check_writable()?;
        let end = offset
            .checked_add(len)
            .ok_or(Error::invalid("size overflow"))?;
        match mode {
            Preallocation::Off | Preallocation::Metadata => {
                if end > self.len()? {
                    self.set_len(end)?;
                }
                Ok(())
            }
            Preallocation::Falloc => {
                if len == 0 {
                    return Ok(());
                }
                match rustix::fs::fallocate(
                    &self.file,
                    rustix::fs::FallocateFlags::empty(),
                    offset,
                    len,
                ) {
                    Ok(()) => Ok(()),
                    Err(_) => write_zeroes_by_buffer(self, offset, len),
                }
            }
            Preallocation::Full => write_zeroes_by_buffer(self, offset, len),
        }
    }

    // SEEK_DATA / SEEK_HOLE fail with ENXIO (`Ok(None)` here) at or past the end of
    // the file, so the length is only asked for where they are not supported (one
    // `statx` less per call: convert maps every chunk).
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        match self.seek(rustix::fs::SeekFrom::Data(offset)) {
            Ok(r) => Ok(r),
            // File systems without SEEK_DATA: everything is data.
            Err(_) => Ok((offset < self.len()?).then_some(offset)),
        }
    }

    fn next_hole(&self, offset: u64) -> Result<u64> {
        match self.seek(rustix::fs::SeekFrom::Hole(offset)) {
            Ok(Some(pos)) => Ok(pos),
            Ok(None) => Ok(offset),
            Err(_) => Ok(self.len()?.max(offset)),
        }
    }

    fn allocated_bytes(&self) -> Result<Option<u64>> {
        use std::os::unix::fs::MetadataExt;
        let md = self
            .file
            .metadata()
            .map_err(|e| Error::io("could not stat file", e))?;
        Ok(Some(md.blocks().saturating_mul(512)))
    }
    /// `posix_fadvise(POSIX_FADV_DONTNEED)`: Linux submits the range's dirty pages for
    /// writeback without waiting and drops the pages already clean (only whole pages
    /// inside the range).
    fn start_writeback(&self, offset: u64, len: u64) {
        if self.direct.is_some() {
            return;
        }
        if let Some(len) = std::num::NonZeroU64::new(len) {
            let advice = rustix::fs::Advice::DontNeed;
            let _ = rustix::fs::fadvise(&self.file, offset, Some(len), advice);
        }
    }
    /// `None` with `O_DIRECT`: `copy_file_range` would go through the page cache.
    fn host_file(&self) -> Option<&File> {
        self.direct.is_none().then_some(&self.file)
    }
}

/// A growable in-memory storage, for tests, examples and in-process pipelines.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    max_len: Option<u64>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(bytes),
            max_len: None,
        }
    }

    /// An empty storage that refuses to grow beyond `max_len` bytes (so hostile images
    /// cannot make tests allocate gigabytes).
    pub fn with_max_len(max_len: u64) -> Self {
        Self {
            data: RwLock::new(Vec::new()),
            max_len: Some(max_len),
        }
    }

    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn grow(&self, data: &mut Vec<u8>, end: u64) -> Result<()> {
        if let Some(max) = self.max_len.filter(|&max| end > max) {
            return Err(Error::LimitExceeded {
                what: "in-memory storage",
                requested: end,
                limit: max,
            });
        }
        let end = usize::try_from(end).map_err(|_| Error::invalid("storage too large"))?;
        if end > data.len() {
            data.resize(end, 0);
        }
        Ok(())
    }
}

fn range(offset: u64, len: usize) -> Result<(usize, usize)> {
    let start = usize::try_from(offset).map_err(|_| Error::invalid("offset too large"))?;
    let end = start
        .checked_add(len)
        .ok_or(Error::invalid("offset overflow"))?;
    Ok((start, end))
}

fn short_read(offset: u64, len: usize) -> Error {
    Error::io(
        format!("could not read {len} bytes at offset {offset}"),
        std::io::ErrorKind::UnexpectedEof.into(),
    )
}

impl Storage for MemStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let (start, end) = range(offset, buf.len())?;
        let src = data
            .get(start..end)
            .ok_or_else(|| short_read(offset, buf.len()))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let (start, end) = range(offset, buf.len())?;
        self.grow(&mut data, end as u64)?;
        if let Some(dst) = data.get_mut(start..end) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        if len > data.len() as u64 {
            self.grow(&mut data, len)
        } else {
            data.truncate(usize::try_from(len).unwrap_or(usize::MAX));
            Ok(())
        }
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let len = usize::try_from(len).map_err(|_| Error::invalid("length too large"))?;
        let (start, end) = range(offset, len)?;
        self.grow(&mut data, end as u64)?;
        if let Some(dst) = data.get_mut(start..end) {
            dst.fill(0);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let dlen = data.len() as u64;
        let end = offset.saturating_add(len).min(dlen);
        let (start, end) = (usize::try_from(offset), usize::try_from(end));
        if let (Ok(start), Ok(end)) = (start, end)
            && let Some(dst) = data.get_mut(start..end.max(start))
        {
            dst.fill(0);
        }
        Ok(())
    }

    fn discard_zeroes(&self) -> bool {
        true
    }
}

/// Wraps a storage and refuses every write.
#[derive(Debug)]
pub struct ReadOnlyStorage<S>(pub S);

impl<S: Storage> Storage for ReadOnlyStorage<S> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn len(&self) -> Result<u64> {
        self.0.len()
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn preallocate(&self, _offset: u64, _len: u64, _mode: Preallocation) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.0.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> Result<u64> {
        self.0.next_hole(offset)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.0.allocated_bytes()
    }
    /// The wrapped storage's file, as a copy *source* only: [`Storage::is_read_only`] is
    /// true, so [`copy_range`](crate::copy_range) refuses to write to it (and a file
    /// opened read-only would refuse anyway).
    fn host_file(&self) -> Option<&File> {
        self.0.host_file()
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_all_at(buf, offset)
    }
    fn read_vectored_exact_at(
        &self,
        bufs: &mut [std::io::IoSliceMut<'_>],
        offset: u64,
    ) -> Result<()> {
        (**self).read_vectored_exact_at(bufs, offset)
    }
    fn write_vectored_all_at(&self, bufs: &[std::io::IoSlice<'_>], offset: u64) -> Result<()> {
        (**self).write_vectored_all_at(bufs, offset)
    }
    fn len(&self) -> Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        (**self).set_len(len)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn discard_zeroes(&self) -> bool {
        (**self).discard_zeroes()
    }
    fn preallocate(&self, offset: u64, len: u64, mode: Preallocation) -> Result<()> {
        (**self).preallocate(offset, len, mode)
    }
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        (**self).next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> Result<u64> {
        (**self).next_hole(offset)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        (**self).allocated_bytes()
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        (**self).start_writeback(offset, len)
    }
    fn host_file(&self) -> Option<&File> {
        (**self).host_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_storage_round_trip_and_short_read() {
        let s = MemStorage::new();
        s.write_all_at(b"hello", 10).unwrap();
        assert_eq!(s.len().unwrap(), 15);
        let mut buf = [0u8; 5];
        s.read_exact_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(s.read_exact_at(&mut buf, 12).is_err());
        s.write_zeroes(11, 2).unwrap();
        s.read_exact_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"h\0\0lo");
    }

    #[test]
    fn mem_storage_limit() {
        let s = MemStorage::with_max_len(100);
        assert!(matches!(
            s.write_all_at(&[1], 100),
            Err(Error::LimitExceeded { .. })
        ));
        s.write_all_at(&[1], 99).unwrap();
    }

    #[test]
    fn file_storage_holes_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(dir.path().join("f")).unwrap();
        s.set_len(4 << 20).unwrap();
        s.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        let d = s.next_data(0).unwrap().unwrap();
        assert!(d <= 1 << 20);
        let h = s.next_hole(1 << 20).unwrap();
        assert!(h >= (1 << 20) + 4096);
        s.write_zeroes(1 << 20, 4096).unwrap();
        let mut buf = [1u8; 4096];
        s.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(s.len().unwrap(), 4 << 20);
        let ro = ReadOnlyStorage(FileStorage::open(dir.path().join("f"), true).unwrap());
        assert!(matches!(ro.write_all_at(&[1], 0), Err(Error::ReadOnly)));
    }
}
