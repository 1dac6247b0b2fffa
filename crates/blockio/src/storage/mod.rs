//! Host storage: the bytes an image lives in.
//!
//! [`Storage`] is positional, `&self`, and `Send + Sync`: a format driver may read and write
//! it from many threads at once. Implementations here: [`FileStorage`] (a host file through
//! `pread`/`pwrite`), [`MemStorage`] (a growable in-memory buffer) and [`ReadOnlyStorage`]
//! (a wrapper refusing writes); [`FaultStorage`] injects crashes for tests. One file per
//! kind; `direct.rs` is [`FileStorage`]'s `O_DIRECT` alignment, `dirty.rs` its cache of
//! partial blocks, `readers.rs` its reading threads' descriptions of the file.

use std::fs::File;

use crate::error::{Error, Result};

mod debug_event;
pub(crate) mod direct;
mod dirty;
mod fault;
mod file;
mod mem;
mod read_only;
mod readers;
#[cfg(target_os = "linux")]
pub(crate) mod uring;

pub use debug_event::DebugEvent;
pub use fault::{CrashMode, FaultStorage};
pub use file::FileStorage;
pub use mem::MemStorage;
pub use read_only::ReadOnlyStorage;
#[cfg(target_os = "linux")]
pub(crate) use uring::{Piece, gather, park_until, plug};
#[cfg(target_os = "linux")]
pub use uring::{RawBuf, Uring, UringStorage};

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
    /// As [`Storage::write_zeroes`], releasing the host space where the storage can
    /// while guaranteeing zeroes (qemu's write-zeroes with `BDRV_REQ_MAY_UNMAP`: a hole
    /// punched in a file). The default writes zeroes.
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
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
    /// Reads exactly `buf.len()` bytes at `offset` as [`Storage::read_exact_at`] does,
    /// leaving the host's page cache as it was: for a format sniff that the caller may
    /// not need (on ext4 and XFS, cached pages of an unwritten extent make `SEEK_DATA`
    /// report it as data, so a read of a raw image's zeroed head would change its map).
    /// The default is [`Storage::read_exact_at`].
    fn peek_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_exact_at(buf, offset)
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
    /// Whether [`Storage::write_vectored_all_at`] writes a scatter-gather list as one
    /// request (a host file, buffered or `O_DIRECT`), so that a format may hand it a
    /// guest's pages as they are instead of gathering them into a buffer first; false
    /// (the default): the list is written buffer by buffer.
    fn writes_vectored(&self) -> bool {
        false
    }
    /// The io_uring storage holding the bytes at the same offsets, for the async face
    /// ([`AsyncDevice`](crate::AsyncDevice)) to read them without a blocked thread. Only
    /// [`UringStorage`] (and `Arc`s of it) return it; a wrapper that translates,
    /// decrypts or refuses writes must return `None` (the default).
    #[cfg(target_os = "linux")]
    fn uring(&self) -> Option<&UringStorage> {
        None
    }
    /// How to read `len` bytes at `offset` with one plain `preadv(2)` of a host file that
    /// returns exactly what [`Storage::read_exact_at`] would (for a detached read the
    /// kernel completes later: [`Uring::readv_detached`]); `None` when there is no such
    /// read. The default is `None`: only a host file's own storage answers (and
    /// wrappers that pass every byte on unchanged forward it); one that injects faults,
    /// decrypts, translates offsets or keeps bytes in memory must not. The descriptor is
    /// valid as long as the storage is.
    #[cfg(target_os = "linux")]
    fn plain_read(&self, _offset: u64, _len: u64) -> Option<PlainRead<'_>> {
        None
    }
    /// Tells the storage that the format is about to do the host I/O `event` names
    /// (qemu's `BLKDBG_EVENT`; see [`DebugEvent`]). Test storages (the CLI's `blkdebug`
    /// node) fail the I/O that follows as their rules say; every other storage ignores
    /// it (the default does nothing). Wrappers that pass I/O on unchanged forward it.
    fn debug_event(&self, _event: DebugEvent) {}
}

/// Zero-fills a range with ordinary writes of at most 1 MiB (the loop is
/// [`zero_by_buffer`](crate::zero_by_buffer)'s).
pub fn write_zeroes_by_buffer<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> Result<()> {
    crate::zero::zero_by_buffer(offset, len, |buf, at| s.write_all_at(buf, at))
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn peek_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).peek_exact_at(buf, offset)
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
    fn debug_event(&self, event: DebugEvent) {
        (**self).debug_event(event)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<()> {
        (**self).write_zeroes_unmap(offset, len)
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
    fn writes_vectored(&self) -> bool {
        (**self).writes_vectored()
    }
    #[cfg(target_os = "linux")]
    fn uring(&self) -> Option<&UringStorage> {
        (**self).uring()
    }
    #[cfg(target_os = "linux")]
    fn plain_read(&self, offset: u64, len: u64) -> Option<PlainRead<'_>> {
        (**self).plain_read(offset, len)
    }
}

/// A plain read of a host file ([`Storage::plain_read`]): its descriptor, and what the
/// read's buffers must be aligned to (`O_DIRECT`; 1 for a file in the page cache).
#[cfg(target_os = "linux")]
#[derive(Clone, Copy, Debug)]
pub struct PlainRead<'a> {
    /// The file.
    pub fd: std::os::fd::BorrowedFd<'a>,
    /// Every buffer's address is a multiple of this.
    pub mem_align: usize,
    /// Every buffer's length is a multiple of this.
    pub len_align: usize,
}

#[cfg(target_os = "linux")]
impl PlainRead<'_> {
    /// Whether a buffer of `len` bytes at `addr` may take part in the read.
    pub fn fits(&self, addr: usize, len: usize) -> bool {
        addr.is_multiple_of(self.mem_align.max(1)) && len.is_multiple_of(self.len_align.max(1))
    }
}
