//! Vectored (scatter-gather) I/O: a guest request as a list of buffers that are
//! consecutive in guest space, as a virtio descriptor chain hands them over.
//!
//! [`BlockDevice::read_vectored_at`](crate::BlockDevice::read_vectored_at) and
//! [`BlockDevice::write_vectored_at`](crate::BlockDevice::write_vectored_at) take such
//! lists; their defaults ([`read_walked`], [`read_each`], [`write_each`], which live
//! with the layout walk and the device) read each host run with one vectored call and
//! write each buffer, or a run of small ones gathered, with one positional call, and
//! [`Storage`] has the same pair, whose defaults and `preadv(2)` / `pwritev(2)` loops
//! (`FileStorage`) are here.

use std::io::{IoSlice, IoSliceMut};

use crate::error::{Error, Result};
use crate::storage::Storage;

pub use crate::device::{read_each, write_each};
pub use crate::layout::read_walked;

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

/// Calls `f(buffer, offset)` for each non-empty buffer and its offset, the buffers
/// consecutive from `offset`: the loop of the four per-buffer defaults (two here,
/// [`read_each`] and [`write_each`] for devices).
pub(crate) fn serve_each<B: std::ops::Deref<Target = [u8]>>(
    bufs: impl IntoIterator<Item = B>,
    offset: u64,
    mut f: impl FnMut(B, u64) -> Result<()>,
) -> Result<()> {
    let mut off = offset;
    for b in bufs {
        let n = b.len() as u64;
        if n > 0 {
            f(b, off)?;
        }
        off += n;
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
    serve_each(bufs.iter_mut().map(|b| &mut **b), offset, |b, o| {
        s.read_exact_at(b, o)
    })
}

/// [`Storage::write_vectored_all_at`]'s default: one `write_all_at` per buffer.
pub fn storage_write_each<S: Storage + ?Sized>(
    s: &S,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> Result<()> {
    total_len(bufs.iter().map(|b| b.len()), offset)?;
    serve_each(bufs.iter().map(|b| &**b), offset, |b, o| {
        s.write_all_at(b, o)
    })
}

/// A buffer list `preadv(2)` fills or `pwritev(2)` writes: [`transfer_all`] serves both.
pub(crate) trait IoList: Sized {
    /// What a transfer of 0 bytes before the end means.
    const AT_ZERO: std::io::ErrorKind;
    /// Drops `n` transferred bytes from the front of `bufs`.
    fn advance(bufs: &mut &mut [Self], n: usize);
}

impl IoList for IoSliceMut<'_> {
    const AT_ZERO: std::io::ErrorKind = std::io::ErrorKind::UnexpectedEof;
    fn advance(bufs: &mut &mut [Self], n: usize) {
        IoSliceMut::advance_slices(bufs, n);
    }
}

impl IoList for IoSlice<'_> {
    const AT_ZERO: std::io::ErrorKind = std::io::ErrorKind::WriteZero;
    fn advance(bufs: &mut &mut [Self], n: usize) {
        IoSlice::advance_slices(bufs, n);
    }
}

/// Transfers every buffer from `offset` with `call(buffers, offset)` (one `preadv` or
/// `pwritev`, of at most [`IOV_MAX`] buffers), repeating after short transfers and
/// `EINTR`; 0 bytes before the end is an error.
pub(crate) fn transfer_all<B: IoList>(
    mut bufs: &mut [B],
    offset: u64,
    mut call: impl FnMut(&mut [B], u64) -> std::io::Result<usize>,
) -> std::io::Result<()> {
    let mut off = offset;
    B::advance(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX);
        let got = match call(bufs.get_mut(..n).unwrap_or_default(), off) {
            Ok(0) => return Err(B::AT_ZERO.into()),
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        off += got as u64;
        B::advance(&mut bufs, got);
    }
    Ok(())
}

/// Fills every buffer from `file` at `offset` with `preadv(2)`, repeating after short
/// reads; the end of the file before the buffers are full is an error.
pub(crate) fn preadv_exact(
    file: &std::fs::File,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> std::io::Result<()> {
    transfer_all(bufs, offset, |b, o| Ok(rustix::io::preadv(file, b, o)?))
}

/// Writes every buffer to `file` at `offset` with `pwritev(2)`, repeating after short
/// writes.
pub(crate) fn pwritev_all(
    file: &std::fs::File,
    bufs: &mut [IoSlice<'_>],
    offset: u64,
) -> std::io::Result<()> {
    transfer_all(bufs, offset, |b, o| Ok(rustix::io::pwritev(file, b, o)?))
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

    /// A device of 4 MiB in memory that records each `write_at` call.
    #[derive(Debug, Default)]
    struct Calls {
        data: std::sync::Mutex<Vec<u8>>,
        writes: std::sync::Mutex<Vec<(u64, usize)>>,
    }

    impl crate::BlockDevice for Calls {
        fn info(&self) -> crate::DeviceInfo {
            crate::DeviceInfo::new("calls", 4 << 20)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let d = self.data.lock().unwrap();
            let at = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&d[at..at + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.writes.lock().unwrap().push((offset, buf.len()));
            let mut d = self.data.lock().unwrap();
            d.resize(4 << 20, 0);
            let at = usize::try_from(offset).unwrap();
            d[at..at + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn map(&self, offset: u64, len: u64) -> Result<crate::Extent> {
            Err(Error::invalid(format!("no map {offset} {len}")))
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    #[test]
    fn device_writes_gather_small_buffers() {
        use crate::BlockDevice;
        let dev = Calls::default();
        // 3 pages, one large buffer, 300 pages (more than 1 MiB gathered), an empty one.
        let page = |i: usize| vec![u8::try_from(i % 251).unwrap(); 4096];
        let mut owned: Vec<Vec<u8>> = (0..3).map(page).collect();
        owned.push(vec![0xee; 128 << 10]);
        owned.extend((3..303).map(page));
        owned.push(Vec::new());
        let bufs: Vec<IoSlice<'_>> = owned.iter().map(|b| IoSlice::new(b)).collect();
        dev.write_vectored_at(&bufs, 512).unwrap();
        let k = 512 + (140 << 10);
        let calls = dev.writes.lock().unwrap().clone();
        let want = [
            (512, 12 << 10),
            (512 + (12 << 10), 128 << 10),
            (k, 1 << 20),
            (k + (1 << 20), 300 * 4096 - (1 << 20)),
        ];
        assert_eq!(calls, want.map(|(o, n)| (o as u64, n)));
        let mut back = vec![0u8; owned.iter().map(Vec::len).sum()];
        dev.read_at(&mut back, 512).unwrap();
        assert_eq!(back, owned.concat());
        // Out of range: refused before any write.
        assert!(dev.write_vectored_at(&bufs, 3 << 20).is_err());
        assert_eq!(dev.writes.lock().unwrap().len(), 4);
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
