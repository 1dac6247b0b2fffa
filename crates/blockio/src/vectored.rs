//! Vectored (scatter-gather) I/O: a guest request as a list of buffers that are
//! consecutive in guest space, as a virtio descriptor chain hands them over.
//!
//! [`BlockDevice::read_vectored_at`] and
//! [`BlockDevice::write_vectored_at`] take such
//! lists; the defaults here serve each buffer with one positional call (no bounce
//! buffer), and [`Storage`] has the same pair, which `FileStorage` answers with
//! `preadv(2)` / `pwritev(2)`.

use std::io::{IoSlice, IoSliceMut};

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Most buffers one `preadv`/`pwritev` call takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// The total length of a buffer list, checked against `offset` overflowing.
pub fn total_len(lens: impl Iterator<Item = usize>, offset: u64) -> Result<u64> {
    let mut total = 0u64;
    for l in lens {
        total = total
            .checked_add(l as u64)
            .ok_or(Error::invalid("vectored request too long"))?;
    }
    offset.checked_add(total).ok_or(Error::invalid(
        "vectored request beyond the addressable range",
    ))?;
    Ok(total)
}

/// [`BlockDevice::read_vectored_at`]'s default: one `read_at` per buffer.
pub fn read_each<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> Result<()> {
    crate::check_range(
        offset,
        total_len(bufs.iter().map(|b| b.len()), offset)?,
        dev.virtual_size(),
    )?;
    let mut off = offset;
    for b in bufs.iter_mut().filter(|b| !b.is_empty()) {
        dev.read_at(b, off)?;
        off += b.len() as u64;
    }
    Ok(())
}

/// [`BlockDevice::write_vectored_at`]'s default: one `write_at` per buffer.
pub fn write_each<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> Result<()> {
    crate::check_range(
        offset,
        total_len(bufs.iter().map(|b| b.len()), offset)?,
        dev.virtual_size(),
    )?;
    let mut off = offset;
    for b in bufs.iter().filter(|b| !b.is_empty()) {
        dev.write_at(b, off)?;
        off += b.len() as u64;
    }
    Ok(())
}

/// [`Storage::read_vectored_exact_at`]'s default: one `read_exact_at` per buffer.
pub fn storage_read_each<S: Storage + ?Sized>(
    s: &S,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> Result<()> {
    total_len(bufs.iter().map(|b| b.len()), offset)?;
    let mut off = offset;
    for b in bufs.iter_mut() {
        s.read_exact_at(b, off)?;
        off += b.len() as u64;
    }
    Ok(())
}

/// [`Storage::write_vectored_all_at`]'s default: one `write_all_at` per buffer.
pub fn storage_write_each<S: Storage + ?Sized>(
    s: &S,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> Result<()> {
    total_len(bufs.iter().map(|b| b.len()), offset)?;
    let mut off = offset;
    for b in bufs {
        s.write_all_at(b, off)?;
        off += b.len() as u64;
    }
    Ok(())
}

/// Fills every buffer from `file` at `offset` with `preadv(2)`, repeating after short
/// reads; the end of the file before the buffers are full is an error.
pub(crate) fn preadv_exact(
    file: &std::fs::File,
    mut bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> std::io::Result<()> {
    let mut off = offset;
    IoSliceMut::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX);
        let chunk = bufs.get_mut(..n).unwrap_or_default();
        let got = match rustix::io::preadv(file, chunk, off) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => k,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        off += got as u64;
        IoSliceMut::advance_slices(&mut bufs, got);
    }
    Ok(())
}

/// Writes every buffer to `file` at `offset` with `pwritev(2)`, repeating after short
/// writes.
pub(crate) fn pwritev_all(
    file: &std::fs::File,
    mut bufs: &mut [IoSlice<'_>],
    offset: u64,
) -> std::io::Result<()> {
    let mut off = offset;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX);
        let chunk = bufs.get(..n).unwrap_or_default();
        let put = match rustix::io::pwritev(file, chunk, off) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(k) => k,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        off += put as u64;
        IoSlice::advance_slices(&mut bufs, put);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FileStorage, MemStorage};

    #[test]
    fn file_storage_vectored_round_trip_and_short_read() {
        let dir = std::env::temp_dir().join(format!("blockio-vec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let s = FileStorage::create(&path).unwrap();
        let (a, b, c) = (vec![1u8; 3000], vec![2u8; 0], vec![3u8; 5000]);
        let bufs = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&c)];
        s.write_vectored_all_at(&bufs, 100).unwrap();
        assert_eq!(s.len().unwrap(), 8100);
        let mut whole = vec![0u8; 8000];
        s.read_exact_at(&mut whole, 100).unwrap();
        assert!(whole[..3000].iter().all(|&x| x == 1) && whole[3000..].iter().all(|&x| x == 3));
        let (mut x, mut y) = (vec![0u8; 10], vec![0u8; 7990]);
        let mut rb = [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)];
        s.read_vectored_exact_at(&mut rb, 100).unwrap();
        assert_eq!(x, vec![1u8; 10]);
        assert_eq!(&y[..], &whole[10..]);
        // Past the end: an error, as read_exact_at.
        let mut z = vec![0u8; 200];
        let mut rb = [IoSliceMut::new(&mut x), IoSliceMut::new(&mut z)];
        assert!(s.read_vectored_exact_at(&mut rb, 7950).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn defaults_serve_each_buffer() {
        let s = MemStorage::new();
        let bufs = [IoSlice::new(b"ab"), IoSlice::new(b"cde")];
        s.write_vectored_all_at(&bufs, 1).unwrap();
        let (mut p, mut q) = ([0u8; 1], [0u8; 5]);
        let mut rb = [IoSliceMut::new(&mut p), IoSliceMut::new(&mut q)];
        s.read_vectored_exact_at(&mut rb, 0).unwrap();
        assert_eq!((p, q), ([0], *b"abcde"));
        assert!(total_len([usize::MAX, 2].into_iter(), 0).is_err());
        assert!(total_len([4].into_iter(), u64::MAX - 2).is_err());
    }
}
