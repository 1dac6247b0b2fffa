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
fn hdr(k: u16) -> u64 {
    0x1_0000 + u64::from(k) * 0x100
}
fn data(k: u16) -> u64 {
    0x4_0000 + u64::from(k) * 0x4000
}

/// A queue of 64 entries over `mem`, ready as the driver would leave it.
fn vring(
    mem: &GuestMemoryMmap,
    q: &MockSplitQueue<GuestMemoryMmap>,
) -> VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>> {
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
fn submit(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, reqs: &[(u32, u64, u32)]) {
    let mut descs = Vec::new();
    for (k, &(ty, sector, len)) in reqs.iter().enumerate() {
        let k = u16::try_from(k).unwrap();
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
    q.add_desc_chains(&descs, 0).unwrap();
}

/// The used ring: descriptor head to used length, asserting no head appears twice.
fn used(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> BTreeMap<u16, u32> {
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

#[test]
fn a_lone_large_write_is_split_and_completes_once() {
    let (mem, rec, export) = recording_slow(None, Duration::ZERO);
    let be = backend(export, &mem);
    let q = MockSplitQueue::new(&mem, 64);
    let vr = vring(&mem, &q);
    let bytes = pattern(128 << 10, 7);
    mem.write_slice(&bytes, GuestAddress(data(0))).unwrap();
    submit(&mem, &q, &[(1, 0, 128 << 10)]);
    be.handle_event(0, EventSet::IN, std::slice::from_ref(&vr), 0)
        .unwrap();
    be.quiesce();
    assert_eq!(used(&mem, &q), BTreeMap::from([(0, 1)]));
    let w = rec.writes.lock().unwrap().clone();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(w.len(), if cores > 1 { 2 } else { 1 }, "{w:?}");
    let mut back = vec![0u8; 128 << 10];
    rec.read_at(&mut back, 0).unwrap();
    assert_eq!(back, bytes);
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
