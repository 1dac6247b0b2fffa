//! [`UringStorage`]: a host file whose reads and writes go through io_uring (Linux).
//!
//! A [`Uring`] is one io_uring instance with a queue depth and a completion thread;
//! any number of storages and threads share it (`Arc<Uring>`). Through the blocking
//! [`Storage`] methods each thread has one request in flight, so many threads (a VMM's
//! queues, convert's workers) fill the queue together; the async face
//! ([`AsyncDevice`](crate::AsyncDevice)) puts many requests of one thread in flight at
//! once. Everything but reads and writes (length, resize, zeroes, discard, flush, holes,
//! locks) is the wrapped [`FileStorage`]'s.
//!
//! In cache modes `none` and `directsync` the file is open with `O_DIRECT`: a request
//! whose offset, length and buffer are aligned goes to the kernel as it is; any other
//! falls back to [`FileStorage`]'s aligned bounce path (as qemu sends misaligned
//! requests to its thread pool), and a file system that refuses `O_DIRECT` fails the
//! open as [`FileStorage::open_with`] does and as qemu does.
//!
//! The modules with `unsafe` code in the crate are `ring.rs` and `owned.rs` (why: see
//! their docs).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use super::{FileStorage, Preallocation, Storage};
use crate::aio::IoBuf;
use crate::cache::CacheMode;
use crate::error::{Error, Result};

mod owned;
pub(crate) mod plug;
mod reap;
mod ring;

pub(crate) use reap::park_until;

pub use owned::RawBuf;
pub use ring::Uring;
pub(crate) use ring::{Piece, gather};

/// A host file read and written through an io_uring ([`Uring`]); clones share the file
/// and the ring.
#[derive(Clone, Debug)]
pub struct UringStorage {
    file: Arc<FileStorage>,
    ring: Arc<Uring>,
}

impl UringStorage {
    /// Opens `path` in cache mode `cache` ([`FileStorage::open_with`]) on `ring`.
    pub fn open(
        path: impl AsRef<Path>,
        read_only: bool,
        cache: CacheMode,
        ring: Arc<Uring>,
    ) -> Result<Self> {
        Ok(Self::new(
            FileStorage::open_with(path, read_only, cache)?,
            ring,
        ))
    }

    /// Moves an opened file (with its cache mode and locks) onto `ring`.
    pub fn new(file: FileStorage, ring: Arc<Uring>) -> Self {
        file.stop_block_cache();
        Self {
            file: Arc::new(file),
            ring,
        }
    }

    /// [`UringStorage::new`] of a shared file (one whose locks others hold too).
    pub fn from_arc(file: Arc<FileStorage>, ring: Arc<Uring>) -> Self {
        file.stop_block_cache();
        Self { file, ring }
    }

    /// The wrapped file storage (its locks, cache mode and file).
    pub fn file_storage(&self) -> &FileStorage {
        &self.file
    }

    /// The ring requests go through.
    pub fn ring(&self) -> &Arc<Uring> {
        &self.ring
    }

    /// True when `len` bytes at `offset` from `ptr` may go to the ring: always without
    /// `O_DIRECT`, when aligned with it.
    fn fits(&self, ptr: *const u8, offset: u64, len: usize) -> bool {
        self.file
            .direct_io()
            .is_none_or(|d| d.fits(ptr, offset, len))
    }

    /// A piece of an owned-buffer read for the async face, when it may go to the ring.
    pub(crate) fn piece(&self, buf: &IoBuf, at: usize, host: u64, len: usize) -> Option<Piece> {
        let ptr = buf.as_slice().as_ptr().wrapping_add(at);
        self.fits(ptr, host, len).then(|| Piece {
            ring: self.ring.clone(),
            file: self.file.clone(),
            host,
            at,
            len,
        })
    }

    fn read_error(len: usize, offset: u64, e: std::io::Error) -> Error {
        Error::io(format!("could not read {len} bytes at offset {offset}"), e)
    }

    fn write_error(len: usize, offset: u64, e: std::io::Error) -> Error {
        Error::io(format!("could not write {len} bytes at offset {offset}"), e)
    }
}

/// The kernel's result as bytes transferred or an error.
fn result(r: i32) -> std::io::Result<usize> {
    usize::try_from(r).map_err(|_| std::io::Error::from_raw_os_error(r.saturating_neg()))
}

fn eof() -> std::io::Error {
    std::io::ErrorKind::UnexpectedEof.into()
}

impl Storage for UringStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len();
        if !self.fits(buf.as_ptr(), offset, len) {
            return self.file.read_exact_at(buf, offset);
        }
        let mut done = 0usize;
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            let at = offset + done as u64;
            let n = result(self.ring.read(self.file.file().as_fd(), rest, at))
                .map_err(|e| Self::read_error(len, offset, e))?;
            if n == 0 {
                return Err(Self::read_error(len, offset, eof()));
            }
            done += n;
            // O_DIRECT continues only at aligned offsets: finish on the bounce path.
            if done < len && !self.fits(buf.as_ptr().wrapping_add(done), at + n as u64, 0) {
                let tail = buf.get_mut(done..).unwrap_or_default();
                return self.file.read_exact_at(tail, offset + done as u64);
            }
        }
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.file.is_read_only() {
            return Err(Error::ReadOnly);
        }
        let len = buf.len();
        let direct = self.file.direct_io();
        if !self.fits(buf.as_ptr(), offset, len) {
            return self.file.write_all_at(buf, offset);
        }
        let _shared = direct.map(|d| d.shared_write());
        let mut done = 0usize;
        while let Some(rest) = buf.get(done..).filter(|r| !r.is_empty()) {
            let n = result(
                self.ring
                    .write(self.file.file().as_fd(), rest, offset + done as u64),
            )
            .map_err(|e| Self::write_error(len, offset, e))?;
            if n == 0 {
                let e = std::io::ErrorKind::WriteZero.into();
                return Err(Self::write_error(len, offset, e));
            }
            done += n;
        }
        Ok(())
    }

    fn read_vectored_exact_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        if self.file.direct_io().is_some() {
            return crate::vectored::storage_read_each(self, bufs, offset);
        }
        let len = crate::vectored::total_len(bufs.iter().map(|b| b.len()), offset)?;
        let fd = self.file.file().as_fd();
        crate::vectored::transfer_all(bufs, offset, |b, o| result(self.ring.readv(fd, b, o)))
            .map_err(|e| Error::io(format!("could not read {len} bytes at offset {offset}"), e))
    }

    fn write_vectored_all_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        if self.file.is_read_only() {
            return Err(Error::ReadOnly);
        }
        if self.file.direct_io().is_some() {
            return crate::vectored::storage_write_each(self, bufs, offset);
        }
        let len = crate::vectored::total_len(bufs.iter().map(|b| b.len()), offset)?;
        let fd = self.file.file().as_fd();
        let mut list = bufs.to_vec();
        crate::vectored::transfer_all(&mut list, offset, |b, o| result(self.ring.writev(fd, b, o)))
            .map_err(|e| Error::io(format!("could not write {len} bytes at offset {offset}"), e))
    }

    fn len(&self) -> Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len)
    }
    fn flush(&self) -> Result<()> {
        self.file.flush()
    }
    fn is_read_only(&self) -> bool {
        self.file.is_read_only()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.file.write_zeroes(offset, len)
    }
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.file.write_zeroes_unmap(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.file.discard(offset, len)
    }
    fn discard_zeroes(&self) -> bool {
        self.file.discard_zeroes()
    }
    fn preallocate(&self, offset: u64, len: u64, mode: Preallocation) -> Result<()> {
        self.file.preallocate(offset, len, mode)
    }
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.file.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> Result<u64> {
        self.file.next_hole(offset)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.file.allocated_bytes()
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        self.file.start_writeback(offset, len)
    }
    fn host_file(&self) -> Option<&std::fs::File> {
        self.file.host_file()
    }
    fn uring(&self) -> Option<&UringStorage> {
        Some(self)
    }
    fn plain_read(&self, offset: u64, len: u64) -> Option<super::PlainRead<'_>> {
        self.file.plain_read(offset, len)
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
pub(crate) mod tests;
