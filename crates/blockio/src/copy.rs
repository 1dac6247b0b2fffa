//! Copying host bytes from one [`Storage`] to another: [`copy_range`].
//!
//! When both storages expose their host file ([`Storage::host_file`]) the copy is
//! `copy_file_range(2)`: the kernel copies without bringing the bytes into this process,
//! and file systems with shared extents (XFS with `reflink=1`, btrfs) may not copy them
//! at all. Otherwise, or when the kernel cannot copy between these two files, the bytes go
//! through a bounded buffer. This is qemu-img's `convert -C` (copy offloading).

use std::fs::File;

use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::storage::Storage;

/// Largest buffer a fallback copy uses.
const BUFFER: u64 = 1 << 20;
/// Largest request handed to one `copy_file_range` call (the kernel copies at most
/// about 2 GiB per call anyway).
const KERNEL_CHUNK: u64 = 1 << 30;

/// Copies `len` bytes at `src_off` in `src` to `dst_off` in `dst` (growing `dst` as a
/// write would), then hints with [`Storage::start_writeback`] on `dst` that the range
/// was written.
///
/// Both storages expose a host file: `copy_file_range` in a loop (short copies are
/// continued; a copy of zero bytes means `src` ended early and fails with an I/O error).
/// A kernel or file system that cannot copy between the two (`EXDEV`, `ENOSYS`,
/// `EOPNOTSUPP`, `EINVAL`) gets the rest through a buffer. Otherwise the copy is a loop
/// of reads and writes of at most 1 MiB.
///
/// Fails with [`Error::ReadOnly`] when `dst` refuses writes, and like
/// [`Storage::read_exact_at`] when `src` holds fewer than `src_off + len` bytes (bytes
/// before the failure may have been copied). Overlapping ranges in one file are not
/// supported.
pub fn copy_range(
    src: &dyn Storage,
    src_off: u64,
    dst: &dyn Storage,
    dst_off: u64,
    len: u64,
) -> Result<()> {
    if dst.is_read_only() {
        return Err(Error::ReadOnly);
    }
    if len == 0 {
        return Ok(());
    }
    if src_off.checked_add(len).is_none() || dst_off.checked_add(len).is_none() {
        return Err(Error::invalid("copy range overflows"));
    }
    let done = match (src.host_file(), dst.host_file()) {
        (Some(s), Some(d)) => kernel_copy(s, src_off, d, dst_off, len)?,
        _ => 0,
    };
    if done < len {
        buffered_copy(src, src_off + done, dst, dst_off + done, len - done)?;
    }
    dst.start_writeback(dst_off, len);
    Ok(())
}

/// `copy_file_range` until `len` bytes are copied, or until the kernel says it cannot
/// copy between these files: returns how many bytes it copied.
fn kernel_copy(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> Result<u64> {
    let mut done = 0u64;
    while done < len {
        let mut s = src_off + done;
        let mut d = dst_off + done;
        let want = usize::try_from((len - done).min(KERNEL_CHUNK)).unwrap_or(1 << 20);
        match rustix::fs::copy_file_range(src, Some(&mut s), dst, Some(&mut d), want) {
            Ok(0) => {
                return Err(Error::io(
                    format!("could not copy {} bytes from offset {s}", len - done),
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Ok(n) => done += n as u64,
            Err(Errno::INTR | Errno::AGAIN) => {}
            Err(Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) => return Ok(done),
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "could not copy {} bytes from offset {s} to offset {d}",
                        len - done
                    ),
                    e.into(),
                ));
            }
        }
    }
    Ok(done)
}

/// Reads and writes through a buffer of at most [`BUFFER`] bytes.
fn buffered_copy(
    src: &dyn Storage,
    src_off: u64,
    dst: &dyn Storage,
    dst_off: u64,
    len: u64,
) -> Result<()> {
    copy_by_buffer(
        len,
        |piece, done| src.read_exact_at(piece, src_off + done),
        |piece, done| dst.write_all_at(piece, dst_off + done),
    )
}

/// Copies `len` bytes through one buffer of at most [`BUFFER`] bytes, piece by piece:
/// `read(piece, done)` fills it, `write(piece, done)` puts it where it goes (`done`: the
/// bytes copied before it). [`copy_range`]'s fallback and
/// [`write_from_by_buffer`](crate::write_from_by_buffer).
pub(crate) fn copy_by_buffer(
    len: u64,
    mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
    mut write: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; usize::try_from(len.min(BUFFER)).unwrap_or(1 << 20)];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(0);
        let piece = buf.get_mut(..n).ok_or(Error::internal("copy buffer"))?;
        read(piece, done)?;
        write(piece, done)?;
        done += n as u64;
    }
    Ok(())
}
