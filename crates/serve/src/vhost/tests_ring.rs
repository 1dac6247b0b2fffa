//! Plain reads on the queue's own io_uring (`ring.rs`), on a real split virtqueue over
//! a raw image in a host file: they complete once each with the file's bytes without a
//! device read; a lone read completes before the handler returns; a moved host epoch,
//! a device that cannot tell, and writes take the worker path; `quiesce` reaps reads
//! no event loop will.

use std::io::{IoSliceMut, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diskimg_blockio::{
    BlockDevice, CacheMode, Driver, FileStorage, OpenOptions, Result, RunFn, Storage,
    forward_device,
};
use vhost_user_backend::VhostUserBackend;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::VhostConfig;
use super::backend::BlkBackend;
use super::tests::{W, desc, pattern};
use super::tests_backend::{Vring, data, hdr, submit, used, vring};
use crate::export::{Export, ExportOptions};
use virtio_queue::desc::RawDescriptor;

/// A device that counts the reads it executes itself and can make its host epoch move
/// at every look.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn BlockDevice>,
    reads: AtomicUsize,
    moving: AtomicBool,
    looks: AtomicU64,
}

impl BlockDevice for Counting {
    forward_device!(inner: info, walk_runs, write_at, write_vectored_at, flush, map);
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_vectored_at(bufs, offset)
    }
    fn host_epoch(&self) -> Option<u64> {
        let e = self.inner.host_epoch()?;
        if self.moving.load(Ordering::SeqCst) {
            return Some(e + self.looks.fetch_add(1, Ordering::SeqCst));
        }
        Some(e)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

const IMAGE: usize = 1 << 20;

/// A guest memory, a raw image of [`IMAGE`] pattern bytes in a host file, the counting
/// device over it, and a backend with queue rings (`ring_depth`; 0: none).
struct Rig {
    _dir: tempfile::TempDir,
    mem: GuestMemoryMmap,
    dev: Arc<Counting>,
    bytes: Vec<u8>,
    be: BlkBackend,
    q: MockSplitQueue<'static, GuestMemoryMmap>,
    vr: Vring,
}

fn rig(ring_depth: u16, read_only: bool) -> Rig {
    rig_cached(ring_depth, read_only, CacheMode::Writeback)
}

fn rig_cached(ring_depth: u16, read_only: bool, cache: CacheMode) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.raw");
    let bytes = pattern(IMAGE, 3);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    let file: Arc<dyn Storage> = Arc::new(FileStorage::open_with(&path, read_only, cache).unwrap());
    let inner = diskimg_raw::DRIVER.open(file, &OpenOptions::new()).unwrap();
    let dev = Arc::new(Counting {
        inner,
        reads: AtomicUsize::new(0),
        moving: AtomicBool::new(false),
        looks: AtomicU64::new(0),
    });
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    // The mock queue borrows the memory for the test's length: leak one clone.
    let leaked: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
    let q = MockSplitQueue::new(leaked, 64);
    let vr = vring(&mem, &q);
    let mut opts = ExportOptions::named("t");
    opts.read_only = read_only;
    let export = Arc::new(Export::new(dev.clone(), opts));
    let config = VhostConfig {
        ring_depth,
        ..VhostConfig::default()
    };
    let be = BlkBackend::new(export, config, GuestMemoryAtomic::new(mem.clone())).unwrap();
    Rig {
        _dir: dir,
        mem,
        dev,
        bytes,
        be,
        q,
        vr,
    }
}

impl Rig {
    /// Kicks queue 0, then handles its ring's events (as its event loop would) until
    /// `n` requests are in the used ring.
    fn run_until(&self, n: usize) {
        serve_until(&self.be, 0, &self.vr, n, || used(&self.mem, &self.q).len());
    }

    /// Every request of [`sixteen_reads`] completed with its data.
    fn assert_sixteen_reads(&self) {
        for k in 0..16u16 {
            self.assert_read(k, sector(k), 8192);
        }
    }

    /// Request `k` read sectors from `sector` on: its status and data are right.
    fn assert_read(&self, k: u16, sector: u64, len: usize) {
        let mut st = [0u8];
        self.mem
            .read_slice(&mut st, GuestAddress(hdr(k) + 0x80))
            .unwrap();
        assert_eq!(st[0], 0, "status of read {k}");
        let mut got = vec![0u8; len];
        self.mem
            .read_slice(&mut got, GuestAddress(data(k)))
            .unwrap();
        let at = usize::try_from(sector * 512).unwrap();
        assert!(got == self.bytes[at..at + len], "data of read {k}");
        assert_eq!(
            used(&self.mem, &self.q).get(&(3 * k)),
            Some(&(u32::try_from(len).unwrap() + 1))
        );
    }
}

/// Kicks queue `thread` (its thread's only vring, `vr`), then handles its ring's events
/// as its event loop would until `done()` counts `n` completions.
fn serve_until(be: &BlkBackend, thread: usize, vr: &Vring, n: usize, done: impl Fn() -> usize) {
    let vrs = std::slice::from_ref(vr);
    be.handle_event(0, EventSet::IN, vrs, thread).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while done() < n {
        assert!(Instant::now() < end, "requests never completed");
        let Some(ring) = be.ring(thread) else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let fd = ring.event_fd();
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
        let ev = u16::try_from(be.ring_event(thread)).unwrap();
        be.handle_event(ev, EventSet::IN, vrs, thread).unwrap();
    }
}

/// A backend of `num_queues` queues with rings of 8 entries over `export`.
fn ring_backend(export: Export, num_queues: u16, mem: &GuestMemoryMmap) -> BlkBackend {
    let config = VhostConfig {
        num_queues,
        ring_depth: 8,
        ..VhostConfig::default()
    };
    BlkBackend::new(
        Arc::new(export),
        config,
        GuestMemoryAtomic::new(mem.clone()),
    )
    .unwrap()
}

/// Sixteen reads of 8 KiB at distinct sectors ([`sector`]), as one batch.
fn sixteen_reads() -> Vec<(u32, u64, u32)> {
    (0..16u16).map(|k| (0, sector(k), 8192)).collect()
}

/// The first sector [`sixteen_reads`]' request `k` reads.
fn sector(k: u16) -> u64 {
    u64::from(k) * 40 + 1
}

#[test]
fn a_batch_of_reads_completes_once_each_from_the_ring_without_a_device_read() {
    let r = rig(8, false);
    assert!(r.be.ring(0).is_some(), "this kernel has io_uring");
    submit(&r.mem, &r.q, &sixteen_reads());
    r.run_until(16);
    assert_eq!(used(&r.mem, &r.q).len(), 16);
    r.assert_sixteen_reads();
    assert_eq!(
        r.dev.reads.load(Ordering::SeqCst),
        0,
        "every read went to the ring"
    );
    assert_eq!(r.be.ring(0).unwrap().in_flight(), 0);
    assert_eq!(r.be.busy(0), 0);
}

#[test]
fn o_direct_reads_go_to_the_ring_too() {
    let r = rig_cached(8, false, CacheMode::None);
    submit(&r.mem, &r.q, &sixteen_reads());
    r.run_until(16);
    r.assert_sixteen_reads();
    assert_eq!(
        r.dev.reads.load(Ordering::SeqCst),
        0,
        "aligned: every read on the ring"
    );
}

#[test]
fn each_queue_thread_serves_and_reaps_its_own_queue() {
    // Two queues; the daemon hands thread 1 its one vring as `vrings[0]` and numbers its
    // kick event 0 (vhost-user-backend numbers a thread's queues from 0).
    let r = rig(0, false);
    let export = Export::new(r.dev.clone(), ExportOptions::named("2"));
    let be = ring_backend(export, 2, &r.mem);
    submit(&r.mem, &r.q, &sixteen_reads());
    serve_until(&be, 1, &r.vr, 16, || used(&r.mem, &r.q).len());
    assert_eq!(
        be.ring(0).unwrap().in_flight(),
        0,
        "queue 0's ring untouched"
    );
    r.assert_sixteen_reads();
    assert_eq!((be.busy(0), be.busy(1)), (0, 0));
}

#[test]
fn a_lone_read_on_an_idle_queue_completes_before_the_handler_returns() {
    let r = rig(8, true);
    submit(&r.mem, &r.q, &[(0, 7, 4096)]);
    r.be.handle_event(0, EventSet::IN, std::slice::from_ref(&r.vr), 0)
        .unwrap();
    assert_eq!(used(&r.mem, &r.q).len(), 1, "completed in the handler");
    r.assert_read(0, 7, 4096);
    assert_eq!(r.dev.reads.load(Ordering::SeqCst), 0);
}

#[test]
fn reads_whose_host_epoch_moved_are_read_again_by_the_device() {
    let r = rig(8, false);
    r.dev.moving.store(true, Ordering::SeqCst);
    submit(&r.mem, &r.q, &sixteen_reads());
    r.run_until(16);
    r.assert_sixteen_reads();
    assert_eq!(
        r.dev.reads.load(Ordering::SeqCst),
        16,
        "each read again, once"
    );
}

#[test]
fn without_rings_or_a_host_epoch_the_device_reads_and_writes_take_the_workers() {
    // No ring configured.
    let r = rig(0, false);
    assert!(r.be.ring(0).is_none());
    submit(&r.mem, &r.q, &sixteen_reads());
    r.run_until(16);
    assert_eq!(r.dev.reads.load(Ordering::SeqCst), 16);
    // A device that cannot tell (a memory image: no host file, no epoch).
    let (mem, _dev, export) = super::tests::setup();
    let be = ring_backend(export, 1, &mem);
    let q = MockSplitQueue::new(&mem, 64);
    let vr = vring(&mem, &q);
    submit(&mem, &q, &[(0, 0, 4096), (0, 8, 4096)]);
    be.handle_event(0, EventSet::IN, std::slice::from_ref(&vr), 0)
        .unwrap();
    be.quiesce();
    assert_eq!(used(&mem, &q).len(), 2);
    assert_eq!(
        be.ring(0).unwrap().in_flight(),
        0,
        "nothing went to the ring"
    );
    // Writes, beside reads, on a ring backend.
    let r = rig(8, false);
    let new = pattern(4096, 9);
    r.mem.write_slice(&new, GuestAddress(data(1))).unwrap();
    submit(&r.mem, &r.q, &[(0, 100, 4096), (1, 200, 4096)]);
    r.run_until(2);
    r.assert_read(0, 100, 4096);
    let mut back = vec![0u8; 4096];
    r.dev.read_at(&mut back, 200 * 512).unwrap();
    assert_eq!(back, new);
}

#[test]
fn quiesce_reaps_ring_reads_no_event_loop_will() {
    let r = rig(4, false);
    submit(&r.mem, &r.q, &sixteen_reads());
    r.be.handle_event(0, EventSet::IN, std::slice::from_ref(&r.vr), 0)
        .unwrap();
    // The frontend went away: nobody handles the ring's events.
    r.be.quiesce();
    assert_eq!(used(&r.mem, &r.q).len(), 16);
    r.assert_sixteen_reads();
}

#[test]
fn a_walk_past_the_files_end_is_read_by_the_device() {
    // A run the walk reports past the host file's end comes back short from the
    // kernel; the device (which zero-fills) reads it again.
    #[derive(Debug)]
    struct Past(Arc<dyn BlockDevice>, Arc<dyn Storage>, AtomicUsize);
    impl BlockDevice for Past {
        forward_device!(0: info, flush, map);
        fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
            Err(diskimg_blockio::Error::ReadOnly)
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
            self.2.fetch_add(1, Ordering::SeqCst);
            buf.fill(0xee);
            Ok(())
        }
        fn walk_runs(&self, offset: u64, len: u64, f: &mut RunFn<'_>) -> Result<bool> {
            let run = diskimg_blockio::HostRun::new(self.1.as_ref(), offset + (1 << 30));
            f(&Lay, offset, len, diskimg_blockio::Mapping::Host(run))?;
            Ok(true)
        }
        fn host_epoch(&self) -> Option<u64> {
            Some(0)
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }
    struct Lay;
    impl diskimg_blockio::Layout for Lay {
        fn size(&self) -> u64 {
            IMAGE as u64
        }
        fn lookup(&self, _: u64, max: u64) -> Result<(diskimg_blockio::Mapping<'_>, u64)> {
            Ok((diskimg_blockio::Mapping::Zero { host: None }, max))
        }
    }
    let r = rig(8, true);
    let file: Arc<dyn Storage> =
        Arc::new(FileStorage::open(r._dir.path().join("img.raw"), true).unwrap());
    let past = Arc::new(Past(r.dev.clone(), file, AtomicUsize::new(0)));
    let mut opts = ExportOptions::named("p");
    opts.read_only = true;
    let be = ring_backend(Export::new(past.clone(), opts), 1, &r.mem);
    submit(&r.mem, &r.q, &[(0, 3, 4096)]);
    be.handle_event(0, EventSet::IN, std::slice::from_ref(&r.vr), 0)
        .unwrap();
    be.quiesce();
    assert_eq!(used(&r.mem, &r.q).get(&0), Some(&4097));
    let mut got = vec![0u8; 4096];
    r.mem.read_slice(&mut got, GuestAddress(data(0))).unwrap();
    assert_eq!(
        got,
        vec![0xee; 4096],
        "the device's bytes, not the short read's"
    );
    assert_eq!(past.2.load(Ordering::SeqCst), 1);
}

/// A read chain as a driver lays one out, then mangled at random: buffers anywhere
/// (over the rings or the header, outside memory, across regions), any lengths, a
/// sector anywhere, a read-only status byte or data buffer now and then.
fn read_chain(mem: &GuestMemoryMmap, r: &mut diskimg_testutil::Rng) -> Vec<RawDescriptor> {
    use super::tests_hostile::{SIZE, addr, len, pick};
    let head = 0x1_0000 + r.below(0xe_0000);
    let sector = match r.below(4) {
        0 => pick(r, [SIZE / 512 - 1, SIZE / 512, u64::MAX / 512]),
        _ => r.below(SIZE / 512),
    };
    super::tests::header(mem, head, 0, sector);
    let mut descs = vec![desc(head, 16, 0)];
    for _ in 0..1 + r.below(6) {
        let (a, l) = match r.below(3) {
            0 => (addr(r), len(r)),
            _ => (
                0x1_0000 + r.below(0xe_0000),
                u32::try_from(512 * (1 + r.below(16))).unwrap(),
            ),
        };
        let f = if r.below(20) == 0 { 0 } else { W };
        descs.push(desc(a, l, f));
    }
    let st = if r.below(10) == 0 {
        addr(r)
    } else {
        head + 0x80
    };
    let f = if r.below(20) == 0 { 0 } else { W };
    descs.push(desc(st, 1, f));
    descs
}

/// A [`Finisher`](super::ring::Finisher) that records how each chain completed.
#[derive(Clone, Default)]
struct Record(Arc<std::sync::Mutex<Vec<Outcome>>>);

/// A chain's head and its used length (`None`: sent back to the worker path).
type Outcome = (u16, Option<u32>);

impl<M: std::ops::Deref + Clone + Send + Sync + 'static> super::ring::Finisher<M> for Record
where
    M::Target: vm_memory::GuestMemory + Sized,
{
    fn done(&self, chain: &virtio_queue::DescriptorChain<M>, len: u32) {
        self.0.lock().unwrap().push((chain.head_index(), Some(len)));
    }
    fn again(&self, chain: virtio_queue::DescriptorChain<M>) {
        self.0.lock().unwrap().push((chain.head_index(), None));
    }
}

#[test]
fn hostile_chains_on_the_ring_complete_once_without_panics() {
    use super::tests_hostile::{REGIONS, SIZE, writable_bytes};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.raw");
    std::fs::write(&path, pattern(usize::try_from(SIZE).unwrap(), 5)).unwrap();
    let file: Arc<dyn Storage> = Arc::new(FileStorage::open(&path, false).unwrap());
    let dev = diskimg_raw::DRIVER.open(file, &OpenOptions::new()).unwrap();
    let export = Arc::new(Export::new(dev, ExportOptions::named("h")));
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&REGIONS.map(|(a, n)| (GuestAddress(a), n))).unwrap(),
    ));
    let ring = diskimg_blockio::Uring::owned(16).unwrap();
    let mut r = diskimg_testutil::Rng(0x51_7cc1_b727_220a);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let descs = read_chain(mem, &mut r);
        // A fresh queue each time (a request may have written over the last one's rings).
        let q: &'static MockSplitQueue<GuestMemoryMmap> =
            Box::leak(Box::new(MockSplitQueue::new(mem, 16)));
        let Ok(c) = q.build_desc_chain(&descs) else {
            continue;
        };
        let rec = Record::default();
        if !super::ring::try_submit(&export, &ring, &c, || rec.clone()) {
            continue;
        }
        accepted += 1;
        while ring.in_flight() > 0 {
            ring.wait();
        }
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{descs:?}: completed {got:?}");
        if let (_, Some(len)) = got[0] {
            assert!(
                u64::from(len) <= writable_bytes(&descs),
                "{descs:?}: used {len}"
            );
        }
    }
    assert!(accepted > 1000, "only {accepted} chains were plain reads");
}
