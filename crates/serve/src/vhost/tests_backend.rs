//! The queue handler ([`BlkBackend`]) on a real split virtqueue in guest memory: a
//! batch of requests runs on the event thread and the workers, completes in any order,
//! every request exactly once in the used ring; a lone large request is split; and
//! [`BlkBackend::quiesce`] waits for requests the workers still execute (what the
//! server does before its flush when a frontend goes away).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use diskimg_blockio::BlockDevice;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::VhostConfig;
use super::backend::BlkBackend;
use super::tests::{W, header, pattern};
use super::tests_split::recording_slow;
use crate::export::Export;

/// `VRING_DESC_F_NEXT`.
const NEXT: u16 = 1;
/// Where request `k`'s header, status byte and data live in guest memory.
pub(super) fn hdr(k: u16) -> u64 {
    0x1_0000 + u64::from(k) * 0x100
}
pub(super) fn data(k: u16) -> u64 {
    0x4_0000 + u64::from(k) * 0x4000
}

pub(super) type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;

/// A queue of 64 entries over `mem`, ready as the driver would leave it.
pub(super) fn vring(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> Vring {
    let vr = VringRwLock::new(GuestMemoryAtomic::new(mem.clone()), 64).unwrap();
    vr.set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
        .unwrap();
    vr.set_queue_size(64);
    vr.set_queue_ready(true);
    vr.set_enabled(true);
    vr
}

/// Requests `(type, sector, bytes)`, each a chain of header, data and status byte at
/// table indices 3k..3k+2, put in the available ring at once.
pub(super) fn submit(
    mem: &GuestMemoryMmap,
    q: &MockSplitQueue<GuestMemoryMmap>,
    reqs: &[(u32, u64, u32)],
) {
    submit_from(mem, q, 0, reqs);
}

/// As [`submit`], numbering the requests from `first` (after earlier submissions).
pub(super) fn submit_from(
    mem: &GuestMemoryMmap,
    q: &MockSplitQueue<GuestMemoryMmap>,
    first: u16,
    reqs: &[(u32, u64, u32)],
) {
    let mut descs = Vec::new();
    for (i, &(ty, sector, len)) in reqs.iter().enumerate() {
        let k = first + u16::try_from(i).unwrap();
        header(mem, hdr(k), ty, sector);
        mem.write_slice(&[0xff], GuestAddress(hdr(k) + 0x80))
            .unwrap();
        let w = if ty == 0 { W } else { 0 };
        let d = |addr, len, flags, next| {
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        };
        descs.push(d(hdr(k), 16, NEXT, 3 * k + 1));
        descs.push(d(data(k), len, NEXT | w, 3 * k + 2));
        descs.push(d(hdr(k) + 0x80, 1, W, 0));
    }
    q.add_desc_chains(&descs, 3 * first).unwrap();
}

/// The used ring: descriptor head to used length, asserting no head appears twice.
pub(super) fn used(
    mem: &GuestMemoryMmap,
    q: &MockSplitQueue<GuestMemoryMmap>,
) -> BTreeMap<u16, u32> {
    let base = q.used_addr().0;
    let idx: u16 = mem.read_obj(GuestAddress(base + 2)).unwrap();
    let mut out = BTreeMap::new();
    for i in 0..u64::from(idx) {
        let id: u32 = mem.read_obj(GuestAddress(base + 4 + 8 * i)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(base + 8 + 8 * i)).unwrap();
        let head = u16::try_from(id).unwrap();
        assert!(
            out.insert(head, len).is_none(),
            "request {head} completed twice"
        );
    }
    out
}

fn backend(export: Export, mem: &GuestMemoryMmap) -> BlkBackend {
    let config = VhostConfig {
        split_min: 64 << 10,
        ..VhostConfig::default()
    };
    BlkBackend::new(
        Arc::new(export),
        config,
        GuestMemoryAtomic::new(mem.clone()),
    )
    .unwrap()
}

#[test]
fn a_batch_completes_every_request_exactly_once() {
    // Sixteen writes of distinct ranges, then reads of them back: slow writes, so the
    // workers finish in an order of their own.
    let (mem, rec, export) = recording_slow(None, Duration::from_millis(5));
    let be = backend(export, &mem);
    let q = MockSplitQueue::new(&mem, 64);
    let vr = vring(&mem, &q);
    let writes: Vec<_> = (0..16u16)
        .map(|k| {
            let bytes = pattern(8192, u8::try_from(k).unwrap());
            mem.write_slice(&bytes, GuestAddress(data(k))).unwrap();
            (1, u64::from(k) * 16, 8192)
        })
        .collect();
    submit(&mem, &q, &writes);
    be.handle_event(0, EventSet::IN, std::slice::from_ref(&vr), 0)
        .unwrap();
    be.quiesce();
    let done = used(&mem, &q);
    assert_eq!(done.len(), 16);
    assert!(done.iter().all(|(h, len)| h % 3 == 0 && *len == 1));
    for k in 0..16u16 {
        let mut st = [0u8];
        mem.read_slice(&mut st, GuestAddress(hdr(k) + 0x80))
            .unwrap();
        assert_eq!(st[0], 0, "status of write {k}");
        let mut back = vec![0u8; 8192];
        rec.read_at(&mut back, u64::from(k) * 16 * 512).unwrap();
        assert_eq!(back, pattern(8192, u8::try_from(k).unwrap()));
    }
    let mut w = rec.writes.lock().unwrap().clone();
    w.sort_unstable();
    let want: Vec<_> = (0..16u64).map(|k| (k * 16 * 512, 8192)).collect();
    assert_eq!(w, want, "each request's data written exactly once");
}

/// Submits 128 KiB writes `ks` (from `data(k)` to sector `256 k`) as one batch and
/// runs them; returns how many device writes each became.
fn write_batch(
    be: &BlkBackend,
    rec: &super::tests_split::Recording,
    (q, vr): (&MockSplitQueue<GuestMemoryMmap>, &Vring),
    mem: &GuestMemoryMmap,
    ks: std::ops::Range<u16>,
) -> Vec<usize> {
    let reqs: Vec<_> = ks
        .clone()
        .map(|k| (1, u64::from(k) * 256, 128 << 10))
        .collect();
    rec.writes.lock().unwrap().clear();
    submit_from(mem, q, ks.start, &reqs);
    be.handle_event(0, EventSet::IN, std::slice::from_ref(vr), 0)
        .unwrap();
    be.quiesce();
    let w = rec.writes.lock().unwrap().clone();
    ks.map(|k| {
        let at = u64::from(k) * (128 << 10);
        w.iter()
            .filter(|(o, _)| (at..at + (128 << 10)).contains(o))
            .count()
    })
    .collect()
}

#[test]
fn a_lone_large_write_is_split_at_queue_depth_one_and_completes_once() {
    let (mem, rec, export) = recording_slow(None, Duration::ZERO);
    let be = backend(export, &mem);
    let q = MockSplitQueue::new(&mem, 64);
    let vr = vring(&mem, &q);
    let bytes = pattern(0x4_0000, 7);
    mem.write_slice(&bytes, GuestAddress(data(0))).unwrap();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let split = if cores > 1 { 2 } else { 1 };
    // The first lone requests run whole; from the third in a row on, they are split.
    assert_eq!(write_batch(&be, &rec, (&q, &vr), &mem, 0..1), [1]);
    assert_eq!(write_batch(&be, &rec, (&q, &vr), &mem, 1..2), [1]);
    assert_eq!(write_batch(&be, &rec, (&q, &vr), &mem, 2..3), [split]);
    assert_eq!(write_batch(&be, &rec, (&q, &vr), &mem, 3..4), [split]);
    // Two at once (a deeper queue) run whole and start the count again.
    assert_eq!(write_batch(&be, &rec, (&q, &vr), &mem, 4..6), [1, 1]);
    assert_eq!(write_batch(&be, &rec, (&q, &vr), &mem, 6..7), [1]);
    let done = used(&mem, &q);
    assert_eq!(done.len(), 7, "every request completes once: {done:?}");
    assert!(done.values().all(|&len| len == 1));
    for k in 0..7u16 {
        let mut st = [0u8];
        mem.read_slice(&mut st, GuestAddress(hdr(k) + 0x80))
            .unwrap();
        assert_eq!(st[0], 0, "status of write {k}");
        let mut back = vec![0u8; 128 << 10];
        rec.read_at(&mut back, u64::from(k) * (128 << 10)).unwrap();
        let from = usize::from(k) * 0x4000;
        assert!(back == bytes[from..from + (128 << 10)], "data of write {k}");
    }
}

#[test]
fn quiesce_waits_for_requests_in_flight() {
    let (mem, rec, export) = recording_slow(None, Duration::ZERO);
    let be = backend(export, &mem);
    let q = MockSplitQueue::new(&mem, 64);
    let vr = vring(&mem, &q);
    // Two writes go to the workers and wait at the gate; the event thread runs the
    // read itself.
    submit(&mem, &q, &[(1, 0, 4096), (1, 8, 4096), (0, 16, 4096)]);
    let closed = rec.gate.write().unwrap();
    be.handle_event(0, EventSet::IN, std::slice::from_ref(&vr), 0)
        .unwrap();
    assert_eq!(used(&mem, &q).len(), 1, "the writes are still in flight");
    drop(closed);
    be.quiesce();
    assert_eq!(used(&mem, &q).len(), 3);
    assert_eq!(rec.writes.lock().unwrap().len(), 2);
}

/// `size_max` and `seg_max` (bytes 8..16 of `virtio_blk_config`) and the feature bits
/// that tell the driver to read them.
fn limits(config: VhostConfig) -> (u32, u32, u64) {
    let (mem, _, export) = super::tests::setup();
    let be = BlkBackend::new(Arc::new(export), config, GuestMemoryAtomic::new(mem)).unwrap();
    let c = be.get_config(8, 8);
    let size_max = u32::from_le_bytes(c[..4].try_into().unwrap());
    let seg_max = u32::from_le_bytes(c[4..].try_into().unwrap());
    (size_max, seg_max, be.features() & 0b110)
}

#[test]
fn segment_limits_in_the_config_space() {
    // Default: no segment size limit (VIRTIO_BLK_F_SIZE_MAX off), queue size - 2 segments.
    assert_eq!(limits(VhostConfig::default()), (0, 1022, 0b100));
    let config = VhostConfig {
        seg_max: 126,
        size_max: 4096,
        ..VhostConfig::default()
    };
    assert_eq!(limits(config), (4096, 126, 0b110));
    let config = VhostConfig {
        queue_size: 128,
        ..VhostConfig::default()
    };
    assert_eq!(limits(config), (0, 126, 0b100));
}

/// A device whose writes at the given offsets panic (a library user's own device, or a
/// bug): `Recording`'s writes otherwise.
#[derive(Debug)]
struct Panicky(Arc<super::tests_split::Recording>, Vec<u64>);

impl BlockDevice for Panicky {
    diskimg_blockio::forward_device!(0: info, read_at, write_zeroes, flush, map);
    fn write_at(&self, buf: &[u8], offset: u64) -> diskimg_blockio::Result<()> {
        self.write_vectored_at(&[std::io::IoSlice::new(buf)], offset)
    }
    fn write_vectored_at(
        &self,
        bufs: &[std::io::IoSlice<'_>],
        offset: u64,
    ) -> diskimg_blockio::Result<()> {
        assert!(!self.1.contains(&offset), "the test device panics here");
        self.0.write_vectored_at(bufs, offset)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A backend over a device whose writes at `panics` panic.
fn panicky(
    panics: Vec<u64>,
) -> (
    GuestMemoryMmap,
    Arc<super::tests_split::Recording>,
    BlkBackend,
) {
    let (mem, rec, _) = recording_slow(None, Duration::ZERO);
    let dev = Arc::new(Panicky(rec.clone(), panics));
    let export = Export::new(dev, crate::export::ExportOptions::named("panics"));
    let be = backend(export, &mem);
    (mem, rec, be)
}

/// The status byte of request `k`.
fn status(mem: &GuestMemoryMmap, k: u16) -> u8 {
    let mut st = [0u8];
    mem.read_slice(&mut st, GuestAddress(hdr(k) + 0x80))
        .unwrap();
    st[0]
}

/// Runs the queue's kick as the event thread does; whether it panicked.
fn kick_panics(be: &BlkBackend, vr: &Vring) -> bool {
    let run = || be.handle_event(0, EventSet::IN, std::slice::from_ref(vr), 0);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(r) => {
            r.unwrap();
            false
        }
        Err(_) => true,
    }
}

/// [`BlkBackend::quiesce`], failing the test if it has not returned within 10 s.
fn quiesce_bounded(be: &BlkBackend) {
    let b = be.clone();
    let t = std::thread::spawn(move || b.quiesce());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !t.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "quiesce waits for a request whose execution panicked"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.join().unwrap();
}

#[test]
fn requests_that_panic_on_the_workers_or_the_event_thread_fail_and_end_in_flight() {
    // Four writes that panic on the workers (as many as the pool has), the last request
    // of the batch (a read) on the event thread.
    let (mem, rec, be) = panicky((0..4).map(|k| k * 8 * 512).collect());
    let q = MockSplitQueue::new(&mem, 64);
    let vr = vring(&mem, &q);
    let mut reqs: Vec<_> = (0..4).map(|k| (1, k * 8, 4096)).collect();
    reqs.push((0, 64, 4096));
    submit(&mem, &q, &reqs);
    assert!(!kick_panics(&be, &vr));
    quiesce_bounded(&be);
    // Each panicked write completes with an I/O error (its status byte only).
    let done = used(&mem, &q);
    assert_eq!(done.len(), 5, "{done:?}");
    for k in 0..4u16 {
        assert_eq!((done[&(3 * k)], status(&mem, k)), (1, 1), "write {k}");
    }
    assert_eq!((done[&12], status(&mem, 4)), (4097, 0), "the read");
    // The workers survived: a batch that needs them still completes.
    let reqs: Vec<_> = (5..9).map(|k| (1, k * 8, 4096)).collect();
    submit_from(&mem, &q, 5, &reqs);
    assert!(!kick_panics(&be, &vr));
    quiesce_bounded(&be);
    assert_eq!(used(&mem, &q).len(), 9);
    assert!((5..9).all(|k| status(&mem, k) == 0));
    assert_eq!(rec.writes.lock().unwrap().len(), 4);
    // A lone write that panics on the event thread itself: the panic stops there.
    submit_from(&mem, &q, 9, &[(1, 0, 4096)]);
    assert!(
        !kick_panics(&be, &vr),
        "the panic reached the queue's thread"
    );
    quiesce_bounded(&be);
    assert_eq!(used(&mem, &q).len(), 10);
    assert_eq!(status(&mem, 9), 1);
}

#[test]
fn without_workers_a_panicking_request_fails_alone_and_the_queue_goes_on() {
    // `--queue-workers 0`: the event thread executes the whole batch; its second write
    // panics. The others complete as usual, and the next batch is served.
    let (mem, rec, _) = recording_slow(None, Duration::ZERO);
    let dev = Arc::new(Panicky(rec.clone(), vec![8 * 512]));
    let export = Export::new(dev, crate::export::ExportOptions::named("panics"));
    let config = VhostConfig {
        workers_per_queue: 0,
        ..VhostConfig::default()
    };
    let be = BlkBackend::new(
        Arc::new(export),
        config,
        GuestMemoryAtomic::new(mem.clone()),
    )
    .unwrap();
    let q = MockSplitQueue::new(&mem, 64);
    let vr = vring(&mem, &q);
    submit(
        &mem,
        &q,
        &[(1, 0, 4096), (1, 8, 4096), (1, 16, 4096), (0, 64, 4096)],
    );
    assert!(
        !kick_panics(&be, &vr),
        "the panic reached the queue's thread"
    );
    quiesce_bounded(&be);
    let done = used(&mem, &q);
    assert_eq!(
        done.len(),
        4,
        "every request of the batch completes: {done:?}"
    );
    let statuses: Vec<_> = (0..4).map(|k| status(&mem, k)).collect();
    assert_eq!(statuses, [0, 1, 0, 0]);
    assert_eq!(
        (done[&3], done[&9]),
        (1, 4097),
        "the panicked write, the read"
    );
    submit_from(&mem, &q, 4, &[(1, 24, 4096)]);
    assert!(!kick_panics(&be, &vr));
    quiesce_bounded(&be);
    assert_eq!((used(&mem, &q).len(), status(&mem, 4)), (5, 0));
    assert_eq!(rec.writes.lock().unwrap().len(), 3);
}

#[test]
fn a_request_leaves_its_busy_count_before_its_used_entry_is_published() {
    // A driver that sees the used entry may send its next request at once: the queue
    // must look idle then (depth-1 detection), so the worker finishing a request takes
    // it off the busy count before it puts it in the used ring. The used ring is held
    // here, so the worker stops in between.
    let (mem, rec, export) = recording_slow(None, Duration::ZERO);
    let be = backend(export, &mem);
    let q = MockSplitQueue::new(&mem, 64);
    let vr = vring(&mem, &q);
    // A lone 128 KiB write: large, it goes to a worker, and waits at the gate.
    submit(&mem, &q, &[(1, 0, 128 << 10)]);
    let closed = rec.gate.write().unwrap();
    be.handle_event(0, EventSet::IN, std::slice::from_ref(&vr), 0)
        .unwrap();
    assert_eq!(be.busy(0), 1);
    let ring = vr.get_mut();
    drop(closed);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while be.busy(0) != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let busy = be.busy(0);
    drop(ring);
    assert_eq!(
        busy, 0,
        "still busy while its used entry waits to be published"
    );
    quiesce_bounded(&be);
    assert_eq!((used(&mem, &q).len(), status(&mem, 0)), (1, 0));
}

#[test]
fn a_split_request_whose_piece_panics_fails_and_ends_in_flight() {
    // The third lone 128 KiB write in a row is split in two; its second piece panics.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if cores < 2 {
        return; // nothing is split on one core (the test above covers the rest)
    }
    let (mem, rec, be) = panicky(vec![2 * (128 << 10) + (64 << 10)]);
    let q = MockSplitQueue::new(&mem, 64);
    let vr = vring(&mem, &q);
    for k in 0..3u16 {
        submit_from(&mem, &q, k, &[(1, u64::from(k) * 256, 128 << 10)]);
        let panicked = kick_panics(&be, &vr);
        assert!(k == 2 || !panicked);
        quiesce_bounded(&be);
    }
    // Its status is an I/O error, written once nobody held the request any more.
    assert_eq!(used(&mem, &q).len(), 3);
    assert_eq!(
        (status(&mem, 0), status(&mem, 1), status(&mem, 2)),
        (0, 0, 1)
    );
    // The queue is idle again (the panicked request left its busy count): the next lone
    // write is split too.
    assert_eq!(write_batch(&be, &rec, (&q, &vr), &mem, 3..4), [2]);
    assert_eq!(used(&mem, &q).len(), 4);
    assert_eq!(status(&mem, 3), 0);
}
