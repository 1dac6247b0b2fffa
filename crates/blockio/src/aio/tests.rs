//! The async face and the vectored layout walk, on a small layout device: 16 KiB blocks
//! mapped to host blocks out of order, a zero block, an unallocated block (from a
//! backing device) and a special block the format decodes itself.

use std::io::IoSliceMut;
use std::sync::Arc;

use super::*;
use crate::device::{Extent, check_range};
use crate::info::DeviceInfo;
use crate::layout::{HostRun, Layout, Mapping, RunFn, map_via, read_via, walk};
use crate::storage::{MemStorage, Storage};

const B: u64 = 16 << 10;
const SIZE: u64 = 8 * B;

/// Guest block `i` lives at host block `HOST[i]`; block 2 is zero, 5 unallocated, 7
/// special (reads as 0x77).
const HOST: [Option<u64>; 8] = [
    Some(3),
    Some(0),
    None,
    Some(6),
    Some(1),
    None,
    Some(2),
    None,
];

#[derive(Debug)]
struct Dev {
    host: Arc<dyn Storage>,
    backing: Option<Arc<dyn BlockDevice>>,
}

impl Layout for Dev {
    fn size(&self) -> u64 {
        SIZE
    }
    fn lookup(&self, offset: u64, max: u64) -> Result<(Mapping<'_>, u64)> {
        let i = usize::try_from(offset / B).unwrap_or(0);
        let n = max.min(B - offset % B);
        let m = match (i, HOST[i]) {
            (_, Some(h)) => Mapping::Host(HostRun::new(self.host.as_ref(), h * B + offset % B)),
            (2, None) => Mapping::Zero { host: None },
            (5, None) => Mapping::Unallocated { host: None },
            _ => Mapping::Special {
                kind: crate::ExtentKind::Compressed,
                token: 0x77,
            },
        };
        Ok((m, n))
    }
    fn read_special(&self, token: u64, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(u8::try_from(token).unwrap_or(0));
        Ok(())
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing.clone()
    }
}

impl BlockDevice for Dev {
    fn info(&self) -> DeviceInfo {
        DeviceInfo::new("test", SIZE)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_via(self, buf, offset)
    }
    fn walk_runs(&self, offset: u64, len: u64, f: &mut RunFn<'_>) -> Result<bool> {
        walk(self, offset, len, f)
    }
    /// Writes only where a block is mapped (enough for these tests).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, SIZE)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (m, n) = self.lookup(pos, (buf.len() - done) as u64)?;
            let Mapping::Host(run) = m else {
                return Err(Error::invalid("write to an unmapped block"));
            };
            let n = usize::try_from(n).unwrap_or(0);
            run.storage.write_all_at(&buf[done..done + n], run.offset)?;
            done += n;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.host.flush()
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        map_via(self, offset, len)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

fn backing() -> Arc<dyn BlockDevice> {
    let host: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![0x55; SIZE as usize]));
    Arc::new(Dev {
        host,
        backing: None,
    })
}

fn dev_on(host: Arc<dyn Storage>) -> Arc<Dev> {
    Arc::new(Dev {
        host,
        backing: Some(backing()),
    })
}

/// Ranges that cross every kind of run, and ones inside host and zero runs only.
const RANGES: [(u64, u64); 7] = [
    (0, SIZE),
    (100, 3 * B),
    (B - 1, 2),
    (3 * B + 5, 2 * B - 9),
    (6 * B, B),
    (2 * B, B),
    (5 * B + 3, 100),
];

#[test]
fn vectored_reads_through_the_walk_match_read_at() {
    let dev = dev_on(Arc::new(MemStorage::from_vec(pattern(SIZE))));
    for (off, len) in RANGES {
        let mut want = vec![0u8; usize::try_from(len).unwrap()];
        dev.read_at(&mut want, off).unwrap();
        // Uneven pieces that straddle the runs, an empty one among them.
        let cut = [0, 1, 4095, 0, 9000, 7];
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let mut left = want.len();
        for c in cut {
            let n = c.min(left);
            pieces.push(vec![0xee; n]);
            left -= n;
        }
        pieces.push(vec![0xee; left]);
        let mut iov: Vec<IoSliceMut<'_>> = pieces.iter_mut().map(|p| IoSliceMut::new(p)).collect();
        dev.read_vectored_at(&mut iov, off).unwrap();
        assert_eq!(pieces.concat(), want, "range {off}+{len}");
    }
    let mut too_far = [0u8; 2];
    assert!(
        dev.read_vectored_at(&mut [IoSliceMut::new(&mut too_far)], SIZE - 1)
            .is_err()
    );
}

#[cfg(target_os = "linux")]
fn uring_dev(dir: &std::path::Path) -> (Arc<Dev>, Vec<u8>) {
    let path = dir.join("host");
    std::fs::write(&path, pattern(SIZE)).unwrap();
    let ring = crate::storage::uring::tests::ring(8);
    let s = crate::UringStorage::open(&path, false, crate::CacheMode::Writeback, ring).unwrap();
    let dev = dev_on(Arc::new(s));
    let mut whole = vec![0u8; SIZE as usize];
    dev.read_at(&mut whole, 0).unwrap();
    (dev, whole)
}

#[cfg(target_os = "linux")]
#[test]
fn async_reads_match_the_sync_path_with_many_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, whole) = uring_dev(dir.path());
    assert_eq!(
        &whole[2 * B as usize..3 * B as usize],
        &[0u8; B as usize][..]
    );
    assert_eq!(whole[7 * B as usize], 0x77);
    let mut from_backing = vec![1u8; B as usize];
    backing().read_at(&mut from_backing, 5 * B).unwrap();
    assert_eq!(&whole[5 * B as usize..6 * B as usize], &from_backing[..]);
    let aio = AsyncDevice::with_workers(dev.clone(), 2).unwrap();
    // Submitted at once (more than the ring's depth), awaited afterwards.
    let futs: Vec<_> = (0..64)
        .map(|i| {
            let (off, len) = RANGES[i % RANGES.len()];
            let off = off + (i as u64 % 3).min(SIZE - off - len);
            (
                off,
                len,
                aio.read_at(IoBuf::new(usize::try_from(len).unwrap()), off),
            )
        })
        .collect();
    for (off, len, f) in futs {
        let got = pollster::block_on(f).unwrap();
        let o = usize::try_from(off).unwrap();
        assert_eq!(
            &got[..],
            &whole[o..o + usize::try_from(len).unwrap()],
            "{off}+{len}"
        );
    }
    // Out of range: an error, not a panic.
    assert!(pollster::block_on(aio.read_at(IoBuf::new(2), SIZE - 1)).is_err());
    // Futures dropped before completion: their reads finish and free the buffers.
    for i in 0..32 {
        drop(aio.read_at(IoBuf::new(4096), i * 512));
    }
    drop(aio);
}

#[cfg(target_os = "linux")]
#[test]
fn plugged_reads_complete_when_polled_or_unplugged() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, whole) = uring_dev(dir.path());
    let aio = AsyncDevice::with_workers(dev, 1).unwrap();
    let at = |i: u64| (i * 4096) % (SIZE - 4096);
    let check = |i: u64, got: IoBuf| {
        let o = usize::try_from(at(i)).unwrap();
        assert_eq!(&got[..], &whole[o..o + 4096], "read {i}");
    };
    let outer = Plug::new();
    let inner = Plug::new();
    let mut futs: Vec<_> = (0..16u64)
        .map(|i| (i, aio.read_at(IoBuf::new(4096), at(i))))
        .collect();
    drop(inner);
    // Still plugged (nested): waiting for one submits what the plug holds back.
    let (i, f) = futs.remove(0);
    check(i, pollster::block_on(f).unwrap());
    let more: Vec<_> = (16..24u64)
        .map(|i| (i, aio.read_at(IoBuf::new(4096), at(i))))
        .collect();
    drop(outer);
    for (i, f) in futs.into_iter().chain(more) {
        check(i, pollster::block_on(f).unwrap());
    }
}

#[cfg(target_os = "linux")]
#[test]
fn async_writes_read_back_through_the_sync_path() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, mut whole) = uring_dev(dir.path());
    let aio = AsyncDevice::new(dev.clone()).unwrap();
    pollster::block_on(async {
        let mut buf = IoBuf::new(2 * B as usize - 7);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let buf = aio.write_at(buf, 3 * B + 7).await.unwrap();
        whole[3 * B as usize + 7..5 * B as usize].copy_from_slice(&buf);
        aio.flush().await.unwrap();
        // A write that needs allocation fails as the sync call does.
        assert!(aio.write_at(IoBuf::new(10), 2 * B).await.is_err());
        assert!(
            aio.write_zeroes(2 * B, 1, crate::ZeroFlags::default())
                .await
                .is_err()
        );
        aio.discard(0, B).await.unwrap();
    });
    let mut sync = vec![0u8; SIZE as usize];
    dev.read_at(&mut sync, 0).unwrap();
    assert_eq!(sync, whole);
    let back = pollster::block_on(aio.read_at(IoBuf::new(SIZE as usize), 0)).unwrap();
    assert_eq!(&back[..], &whole[..]);
}

#[test]
fn devices_without_a_walk_or_uring_use_the_workers() {
    let dev = dev_on(Arc::new(MemStorage::from_vec(pattern(SIZE))));
    let mut whole = vec![0u8; SIZE as usize];
    dev.read_at(&mut whole, 0).unwrap();
    let aio = AsyncDevice::with_workers(dev, 1).unwrap();
    let futs: Vec<_> = RANGES
        .iter()
        .map(|&(o, l)| aio.read_at(IoBuf::new(usize::try_from(l).unwrap()), o))
        .collect();
    for (f, (o, l)) in futs.into_iter().zip(RANGES) {
        let got = pollster::block_on(f).unwrap();
        assert_eq!(&got[..], &whole[o as usize..(o + l) as usize]);
    }
}

/// The same futures on a multi-threaded tokio runtime: tasks on any worker await reads
/// completed by the io_uring completion thread and writes completed by the pool.
#[cfg(target_os = "linux")]
#[test]
fn tokio_tasks_drive_the_same_futures() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, whole) = uring_dev(dir.path());
    let aio = Arc::new(AsyncDevice::new(dev).unwrap());
    let whole = Arc::new(whole);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..32u64)
            .map(|i| {
                let (aio, whole) = (aio.clone(), whole.clone());
                tokio::spawn(async move {
                    let (off, len) = (i * 1999 % (SIZE - 9000), 9000usize);
                    let got = aio.read_at(IoBuf::new(len), off).await.unwrap();
                    let o = usize::try_from(off).unwrap();
                    assert_eq!(&got[..], &whole[o..o + len]);
                    aio.flush().await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// Sets a flag and unparks the thread that polls (a hand-written executor's waker).
struct Flag(std::sync::atomic::AtomicBool, std::thread::Thread);

impl std::task::Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
        self.1.unpark();
    }
}

/// Hand-written executors on three threads sharing one ring, parking with
/// [`park_until`] (which reaps the ring on the waiting thread when none other does):
/// ring reads and worker flushes in flight together all complete with the right bytes.
#[cfg(target_os = "linux")]
#[test]
fn park_until_drives_ring_and_worker_futures_on_several_threads() {
    use std::future::Future;
    use std::sync::atomic::Ordering;
    use std::task::{Context, Poll};
    let dir = tempfile::tempdir().unwrap();
    let (dev, whole) = uring_dev(dir.path());
    let aio = AsyncDevice::with_workers(dev, 2).unwrap();
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (aio, whole) = (&aio, &whole);
            s.spawn(move || {
                let flag = Arc::new(Flag(Default::default(), std::thread::current()));
                let waker = std::task::Waker::from(flag.clone());
                let mut cx = Context::from_waker(&waker);
                let at = |i: u64| (i * 7919 + t * 512) % (SIZE - 4096);
                let (mut next, mut left) = (0u64, 0usize);
                let mut reads: Vec<(u64, IoFuture<IoBuf>)> = Vec::new();
                let mut flushes: Vec<IoFuture<()>> = Vec::new();
                while next < 200 || !reads.is_empty() || !flushes.is_empty() {
                    while next < 200 && reads.len() < 16 {
                        let _plug = Plug::new();
                        reads.push((next, aio.read_at(IoBuf::new(4096), at(next))));
                        if next % 50 == 0 {
                            flushes.push(aio.flush());
                        }
                        next += 1;
                    }
                    flag.0.store(false, Ordering::Release);
                    let before = (left, flushes.len());
                    reads.retain_mut(|(i, f)| match std::pin::Pin::new(f).poll(&mut cx) {
                        Poll::Ready(got) => {
                            let o = usize::try_from(at(*i)).unwrap();
                            assert_eq!(&got.unwrap()[..], &whole[o..o + 4096], "read {i}");
                            left += 1;
                            false
                        }
                        Poll::Pending => true,
                    });
                    flushes.retain_mut(|f| match std::pin::Pin::new(f).poll(&mut cx) {
                        Poll::Ready(r) => {
                            r.unwrap();
                            false
                        }
                        Poll::Pending => true,
                    });
                    if before == (left, flushes.len()) {
                        park_until(|| flag.0.load(Ordering::Acquire));
                    }
                }
                assert_eq!(left, 200);
            });
        }
    });
}
