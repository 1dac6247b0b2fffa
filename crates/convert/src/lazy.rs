//! [`LazyGrowth`]: a file that is grown in name only until it is closed, for `convert
//! -t unsafe`.
//!
//! Why: a qcow2 target grows its file over clusters it allocates ahead (the reserve,
//! at a flush) and cuts it back when it closes. On XFS cutting a file back marks it
//! for a flush at its last close ("NULL files" protection: `xfs_release` starts
//! write-back of every dirty page), and with gigabytes still dirty that close took
//! ~0.9 s in the big benchmark (docs/benchmarks.md, session 9): `-t unsafe`, whose
//! point is to return with the data still in the page cache, wrote it all back first.
//! Growing in name only, the cut back never reaches the file system.

use std::sync::{Arc, Mutex};

use diskimg_blockio::{DebugEvent, Error, Preallocation, Result, Storage, forward_storage};

/// A [`Storage`] whose [`Storage::set_len`] only records a length above the file's
/// (reads see zeroes there, [`Storage::len`] reports it); the file gets it when this
/// storage is dropped, or before an operation that needs the real length
/// (`write_zeroes`, `discard`, `preallocate`, `SEEK_DATA`/`SEEK_HOLE`, allocated bytes).
/// Shrinking below the file's real length truncates the file.
///
/// Flushes do not make the recorded length durable: meant for cache mode `unsafe`,
/// which promises nothing before the image is closed.
#[derive(Debug)]
pub struct LazyGrowth {
    inner: Arc<dyn Storage>,
    /// The length [`Storage::set_len`] asked for, when it is above the file's.
    wanted: Mutex<Option<u64>>,
}

impl LazyGrowth {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self {
            inner,
            wanted: Mutex::new(None),
        }
    }

    fn wanted(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.wanted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the file the recorded length now (as the drop does, with its error).
    pub fn finish(&self) -> Result<()> {
        self.realize()
    }

    /// Gives the file the recorded length, if it is still above the file's.
    fn realize(&self) -> Result<()> {
        let mut w = self.wanted();
        if let Some(n) = w.take()
            && n > self.inner.len()?
        {
            self.inner.set_len(n)?;
        }
        Ok(())
    }
}

impl Drop for LazyGrowth {
    fn drop(&mut self) {
        let _ = self.realize();
    }
}

impl Storage for LazyGrowth {
    forward_storage!(inner: write_all_at, flush, is_read_only, discard_zeroes, start_writeback);

    /// Bytes past the file's end but inside the recorded length read as zeroes.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(Error::invalid("read past the largest offset"))?;
        let real = self.inner.len()?;
        if end <= real || self.wanted().is_none_or(|n| end > n) {
            return self.inner.read_exact_at(buf, offset);
        }
        let have = usize::try_from(real.saturating_sub(offset)).unwrap_or(usize::MAX);
        let (head, tail) = buf.split_at_mut(have.min(buf.len()));
        self.inner.read_exact_at(head, offset)?;
        tail.fill(0);
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        let real = self.inner.len()?;
        Ok(self.wanted().map_or(real, |n| n.max(real)))
    }
    fn set_len(&self, len: u64) -> Result<()> {
        let mut w = self.wanted();
        if len >= self.inner.len()? {
            *w = Some(len);
            return Ok(());
        }
        *w = None;
        self.inner.set_len(len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.realize()?;
        self.inner.write_zeroes(offset, len)
    }
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.realize()?;
        self.inner.write_zeroes_unmap(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.realize()?;
        self.inner.discard(offset, len)
    }
    fn preallocate(&self, offset: u64, len: u64, mode: Preallocation) -> Result<()> {
        self.realize()?;
        self.inner.preallocate(offset, len, mode)
    }
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.realize()?;
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> Result<u64> {
        self.realize()?;
        self.inner.next_hole(offset)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.realize()?;
        self.inner.allocated_bytes()
    }
    fn debug_event(&self, event: DebugEvent) {
        self.inner.debug_event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskimg_blockio::FileStorage;

    #[test]
    fn grows_in_name_and_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = Arc::new(FileStorage::create(&path).unwrap());
        let s = LazyGrowth::new(file.clone());
        s.write_all_at(&[1; 100], 0).unwrap();
        s.set_len(10_000).unwrap();
        assert_eq!((s.len().unwrap(), file.len().unwrap()), (10_000, 100));
        let mut buf = [9u8; 200];
        s.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!((&buf[..100], &buf[100..]), (&[1; 100][..], &[0; 100][..]));
        assert!(s.read_exact_at(&mut buf, 9_800).is_ok());
        assert!(s.read_exact_at(&mut buf, 9_801).is_err());
        // Cut back above the real length: nothing reaches the file.
        s.set_len(4_000).unwrap();
        assert_eq!((s.len().unwrap(), file.len().unwrap()), (4_000, 100));
        // A write past the recorded length grows the file itself.
        s.write_all_at(&[2; 10], 5_000).unwrap();
        assert_eq!(s.len().unwrap(), 5_010);
        // Below the real length: a real truncation.
        s.set_len(50).unwrap();
        assert_eq!((s.len().unwrap(), file.len().unwrap()), (50, 50));
        s.set_len(300).unwrap();
        assert_eq!(s.next_hole(0).unwrap(), 300, "realized first");
        s.set_len(700).unwrap();
        drop(s);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 700);
    }
}
