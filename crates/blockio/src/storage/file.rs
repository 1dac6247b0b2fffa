//! [`FileStorage`]: a host file through positional I/O (`pread`/`pwrite`, `preadv`/`pwritev`)
//! in one of qemu's cache modes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::direct::DirectIo;
use super::readers::Readers;
use super::{Preallocation, Storage, write_zeroes_by_buffer};
use crate::cache::CacheMode;
use crate::error::{Error, Result};

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
    /// Descriptions of the file for threads reading at once (`storage/readers.rs`).
    readers: Readers,
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
            true => Some(
                DirectIo::probe(&file, !cache.write_through())
                    .map_err(|e| Error::io("O_DIRECT alignment", e))?,
            ),
            false => None,
        };
        Ok(Self {
            file,
            read_only,
            cache,
            direct,
            locked: std::sync::Mutex::new(None),
            readers: Readers::default(),
        })
    }

    /// The cache mode the file was opened in.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    pub(crate) fn direct_io(&self) -> Option<&DirectIo> {
        self.direct.as_ref()
    }

    /// Partial blocks go to the device at once from now on (io_uring requests on the
    /// file go around the cache of `storage/dirty.rs`). A failed write-back keeps the
    /// cache on: the error comes back at the next flush.
    pub(crate) fn stop_block_cache(&self) {
        if let Some(d) = &self.direct {
            let _ = d.stop_caching(&self.file);
        }
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
            readers: Readers::default(),
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

    /// Writes back the partial blocks `O_DIRECT` keeps until a flush (see
    /// `storage/dirty.rs`): before a flush and before file operations that go around
    /// them.
    fn write_back(&self) -> Result<()> {
        match &self.direct {
            Some(d) => d
                .write_back(&self.file)
                .map_err(|e| Error::io("could not write cached blocks", e)),
            None => Ok(()),
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
        // Partial blocks still cached (no flush since they were written) reach the file
        // as a close without flush leaves them: written, not durable.
        let _ = self.write_back();
        self.unlock();
    }
}

impl Storage for FileStorage {
    /// Each reading thread reads through a description of the file of its own
    /// (`storage/readers.rs`), so threads reading at once share no per-read kernel state.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let file = self.readers.pick(&self.file);
        match &self.direct {
            Some(d) => d.read_exact(file, buf, offset),
            None => file.read_exact_at(buf, offset),
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
        let len = crate::vectored::total_len(bufs.iter().map(|b| b.len()), offset)?;
        if let Some(d) = &self.direct {
            let file = self.readers.pick(&self.file);
            return match d.read_gathered(file, bufs, offset) {
                Some(r) => r.map_err(|e| {
                    Error::io(format!("could not read {len} bytes at offset {offset}"), e)
                }),
                None => crate::vectored::storage_read_each(self, bufs, offset),
            };
        }
        crate::vectored::preadv_exact(self.readers.pick(&self.file), bufs, offset)
            .map_err(|e| Error::io(format!("could not read {len} bytes at offset {offset}"), e))
    }

    fn write_vectored_all_at(&self, bufs: &[std::io::IoSlice<'_>], offset: u64) -> Result<()> {
        self.check_writable()?;
        let len = crate::vectored::total_len(bufs.iter().map(|b| b.len()), offset)?;
        if let Some(d) = &self.direct {
            return match d.write_gathered(&self.file, bufs, offset) {
                Some(r) => r.map_err(|e| {
                    Error::io(format!("could not write {len} bytes at offset {offset}"), e)
                }),
                None => crate::vectored::storage_write_each(self, bufs, offset),
            };
        }
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
        self.write_back()?;
        self.file
            .set_len(len)
            .map_err(|e| Error::io(format!("could not resize file to {len} bytes"), e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || self.cache.ignores_flush() {
            return Ok(());
        }
        self.write_back()?;
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
        self.write_back()?;
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

    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let file_len = self.len()?;
        if len == 0 || offset >= file_len {
            return self.write_zeroes(offset, len);
        }
        // As qemu's file-posix (`handle_aiocb_write_zeroes_unmap`): a punched hole reads
        // as zeroes; where the file system cannot punch, zeroes are written instead.
        self.write_back()?;
        let in_file = len.min(file_len - offset);
        let punch = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(&self.file, punch, offset, in_file).is_err() {
            return self.write_zeroes(offset, len);
        }
        if in_file < len {
            return self.write_zeroes(offset + in_file, len - in_file);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let file_len = self.len()?;
        if offset >= file_len || len == 0 {
            return Ok(());
        }
        let len = len.min(file_len - offset);
        self.write_back()?;
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
                self.write_back()?;
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
        self.write_back()?;
        match self.seek(rustix::fs::SeekFrom::Data(offset)) {
            Ok(r) => Ok(r),
            // File systems without SEEK_DATA: everything is data.
            Err(_) => Ok((offset < self.len()?).then_some(offset)),
        }
    }

    fn next_hole(&self, offset: u64) -> Result<u64> {
        self.write_back()?;
        match self.seek(rustix::fs::SeekFrom::Hole(offset)) {
            // Under O_DIRECT a data run ending in a partial block at the end of the
            // file counts up to the block's end, as qemu's file driver rounds it
            // (requests cannot end inside a block; the image size is rounded too).
            Ok(Some(pos)) => Ok(match &self.direct {
                Some(d) => pos.next_multiple_of(d.align()),
                None => pos,
            }),
            Ok(None) => Ok(offset),
            Err(_) => Ok(self.len()?.max(offset)),
        }
    }

    fn allocated_bytes(&self) -> Result<Option<u64>> {
        use std::os::unix::fs::MetadataExt;
        self.write_back()?;
        let md = self
            .file
            .metadata()
            .map_err(|e| Error::io("could not stat file", e))?;
        Ok(Some(md.blocks().saturating_mul(512)))
    }
    /// `posix_fadvise(POSIX_FADV_DONTNEED)`: Linux submits the range's dirty pages for
    /// writeback without waiting and drops the pages already clean (only whole pages
    /// inside the range).
    /// Through a second, `O_DIRECT` description of the file (`/proc/self/fd/N`), which
    /// neither fills nor drops cached pages; a plain read where that cannot be had
    /// (file systems without `O_DIRECT`, no `/proc`).
    fn peek_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        if self.direct.is_none() && !buf.is_empty() {
            let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
            if let Ok(d) = Self::open_with(&path, true, CacheMode::None)
                && d.read_exact_at(buf, offset).is_ok()
            {
                return Ok(());
            }
        }
        self.read_exact_at(buf, offset)
    }
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
    fn writes_vectored(&self) -> bool {
        true
    }
    /// The file itself; with `O_DIRECT` only for an aligned range holding no partial
    /// block cached in memory (`storage/dirty.rs`).
    #[cfg(target_os = "linux")]
    fn plain_read(&self, offset: u64, len: u64) -> Option<super::PlainRead<'_>> {
        use std::os::fd::AsFd;
        let (mem_align, len_align) = match &self.direct {
            None => (1, 1),
            Some(d) => d.plain_read(offset, len)?,
        };
        Some(super::PlainRead {
            fd: self.file.as_fd(),
            mem_align,
            len_align,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ReadOnlyStorage;

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
