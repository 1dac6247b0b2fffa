//! The target storage of `convert`'s durable default: flushes are dropped while the
//! image is written, and the caller flushes the real storage once at the end.
//!
//! Format drivers flush between data and metadata writes so that a crash never leaves
//! metadata pointing at unwritten data. While `qemu-img convert` writes a new image it
//! uses `cache=unsafe` (its default `-t`): a crash leaves a useless half-written target
//! anyway, so those ordering flushes only cost time (one `fdatasync` per allocated block
//! in some formats). [`UnsafeCache`] skips them too, but unlike qemu's `unsafe` the
//! caller flushes once at the end, so the image is durable when `convert` returns.
//! (`-t unsafe` given explicitly is qemu's mode: a `FileStorage` whose flush does
//! nothing, without this wrapper.)
//!
//! It also writes behind: once a run of consecutive writes reaches 4 MiB (or a run of
//! at least 256 KiB is broken by a write elsewhere), the run is handed to
//! [`Storage::start_writeback`], so the device writes the image while the conversion
//! goes on and the final flush has little left to wait for. Without it every byte
//! waited in the page cache until that flush: on the benchmark input the conversion
//! took 0.25 s and the flush another 0.35 s (docs/benchmarks.md). Small scattered writes
//! (metadata updates) are never handed over, so their pages stay cached for the next
//! update of the same table.

use std::sync::{Arc, Mutex};

use diskimg_blockio::{Result, Storage, forward_storage};

/// A [`Storage`] that forwards everything to `inner` except [`Storage::flush`], which
/// does nothing. Call [`UnsafeCache::flush_inner`] (or flush the inner storage) when the
/// image is complete.
#[derive(Debug)]
pub struct UnsafeCache {
    inner: Arc<dyn Storage>,
    /// The run of consecutive writes not yet handed to `start_writeback`.
    run: Mutex<Run>,
}

/// Bytes of consecutive writes handed to [`Storage::start_writeback`] at once.
const WRITE_BEHIND_CHUNK: u64 = 4 << 20;
/// A run at least this long is handed over when a write elsewhere ends it.
const WRITE_BEHIND_MIN: u64 = 256 << 10;

/// `start..end`: consecutive bytes written since the last hand-over.
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    start: u64,
    end: u64,
}

impl UnsafeCache {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self {
            inner,
            run: Mutex::new(Run::default()),
        }
    }

    /// Records a completed write and starts writeback of the runs it completes: the
    /// previous run when this write jumps elsewhere, the current one once it is long
    /// enough.
    fn note_write(&self, offset: u64, len: u64) {
        let mut hand = [None, None];
        {
            let Ok(mut run) = self.run.lock() else {
                return;
            };
            let end = offset.saturating_add(len);
            if offset == run.end {
                run.end = end;
            } else {
                if run.end - run.start >= WRITE_BEHIND_MIN {
                    hand[0] = Some(*run);
                }
                *run = Run { start: offset, end };
            }
            if run.end - run.start >= WRITE_BEHIND_CHUNK {
                hand[1] = Some(*run);
                run.start = run.end;
            }
        }
        for r in hand.into_iter().flatten() {
            self.inner.start_writeback(r.start, r.end - r.start);
        }
    }

    /// Makes every completed write durable (the real flush).
    pub fn flush_inner(&self) -> Result<()> {
        self.inner.flush()
    }
}

impl Storage for UnsafeCache {
    forward_storage!(
        inner: read_exact_at,
        len,
        is_empty,
        set_len,
        is_read_only,
        write_zeroes,
        discard,
        discard_zeroes,
        preallocate,
        next_data,
        next_hole,
        allocated_bytes,
    );
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_all_at(buf, offset)?;
        self.note_write(offset, buf.len() as u64);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// Counted as a completed write of the range, so that it joins the runs handed to
    /// the inner storage: [`copy_range`](diskimg_blockio::copy_range) writes into
    /// [`UnsafeCache::host_file`]'s file directly and then calls this.
    fn start_writeback(&self, offset: u64, len: u64) {
        self.note_write(offset, len);
    }
    /// The inner storage's file: `copy_file_range` into it skips
    /// [`Storage::write_all_at`], but the caller reports the range with
    /// [`Storage::start_writeback`] (see above), and flushes are dropped either way.
    fn host_file(&self) -> Option<&std::fs::File> {
        self.inner.host_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskimg_blockio::{CrashMode, FaultStorage};

    #[test]
    fn flushes_are_dropped_until_flush_inner() {
        let fault = Arc::new(FaultStorage::new(Vec::new(), None));
        let s = UnsafeCache::new(fault.clone());
        s.write_all_at(&[7; 512], 0).unwrap();
        s.flush().unwrap();
        // Nothing was made durable: a crash loses the write.
        let lost = fault.crash_image(CrashMode::DropUnflushed);
        assert!(lost.iter().all(|&b| b == 0));
        s.flush_inner().unwrap();
        let kept = fault.crash_image(CrashMode::DropUnflushed);
        assert_eq!(kept.get(..512), Some(&[7u8; 512][..]));
        assert_eq!(s.len().ok(), Some(512));
    }

    /// Records the ranges handed to `start_writeback`.
    #[derive(Debug, Default)]
    struct Recorder {
        mem: diskimg_blockio::MemStorage,
        handed: Mutex<Vec<(u64, u64)>>,
    }

    impl Storage for Recorder {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.mem.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.mem.write_all_at(buf, offset)
        }
        fn len(&self) -> Result<u64> {
            self.mem.len()
        }
        fn set_len(&self, len: u64) -> Result<()> {
            self.mem.set_len(len)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn start_writeback(&self, offset: u64, len: u64) {
            self.handed.lock().unwrap().push((offset, len));
        }
    }

    #[test]
    fn consecutive_writes_are_handed_over_in_runs() {
        let rec = Arc::new(Recorder::default());
        let s = UnsafeCache::new(rec.clone());
        let mib = 1u64 << 20;
        let block = vec![1u8; 1 << 20];
        // 6 MiB appended from 1 MiB, with small metadata writes between them.
        for k in 0..6 {
            s.write_all_at(&block, mib + k * mib).unwrap();
        }
        s.write_all_at(&[2; 8], 0).unwrap();
        // Small writes never make a run worth handing over.
        s.write_all_at(&[3; 512], 64 * mib).unwrap();
        s.write_all_at(&[3; 512], 32 * mib).unwrap();
        // A 512 KiB run broken by another write is handed over.
        s.write_all_at(&block[..256 << 10], 40 * mib).unwrap();
        s.write_all_at(&block[..256 << 10], 40 * mib + (256 << 10))
            .unwrap();
        s.write_all_at(&[4; 8], 8).unwrap();
        let handed = rec.handed.lock().unwrap().clone();
        assert_eq!(
            handed,
            vec![(mib, 4 * mib), (5 * mib, 2 * mib), (40 * mib, 512 << 10)]
        );
        // The data itself went through unchanged.
        let mut buf = [0u8; 8];
        s.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2; 8]);
        s.read_exact_at(&mut buf, 8).unwrap();
        assert_eq!(buf, [4; 8]);
    }

    #[test]
    fn copied_ranges_join_runs_and_expose_the_file() {
        let rec = Arc::new(Recorder::default());
        let s = UnsafeCache::new(rec.clone());
        assert!(s.host_file().is_none());
        let mib = 1u64 << 20;
        // copy_range reports its copies with start_writeback: 3 x 2 MiB consecutive.
        for k in 0..3 {
            s.start_writeback(k * 2 * mib, 2 * mib);
        }
        assert_eq!(*rec.handed.lock().unwrap(), vec![(0, 4 * mib)]);
        let dir = tempfile::tempdir().unwrap();
        let f = diskimg_blockio::FileStorage::create(dir.path().join("f")).unwrap();
        let c = UnsafeCache::new(Arc::new(f));
        assert!(c.host_file().is_some());
    }
}
