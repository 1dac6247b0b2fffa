//! Requests as a driver lays them out: descriptor chains built in guest memory (with
//! virtio-queue's mock queue), executed by [`process`] against an in-memory device.
//! The guest test (crates/cli/tests/it/guest) runs the same code under a real kernel.

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions, OptionList};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::process;
use crate::export::{Export, ExportOptions};

/// `VRING_DESC_F_WRITE`: the device writes this buffer.
pub(super) const W: u16 = 2;
const MEM: usize = 0x10_0000;
/// Where the test requests' buffers live (past the mock queue's rings).
pub(super) const BUFS: u64 = 0x1_0000;

pub(super) fn setup() -> (GuestMemoryMmap, Arc<dyn BlockDevice>, Export) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let s: Arc<dyn diskimg_blockio::Storage> = Arc::new(MemStorage::new());
    let req = &mut CreateRequest::new(1 << 20, OptionList::new());
    diskimg_raw::DRIVER.create(s.clone(), req).unwrap();
    let dev = diskimg_raw::DRIVER.open(s, &OpenOptions::new()).unwrap();
    let export = Export::new(dev.clone(), ExportOptions::named("t"));
    (mem, dev, export)
}

pub(super) fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Puts a request header (type, sector) at `addr`.
pub(super) fn header(mem: &GuestMemoryMmap, addr: u64, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

/// Runs the chain `descs`; returns the used length and the status byte at `status`.
fn run(mem: &GuestMemoryMmap, export: &Export, descs: &[RawDescriptor], status: u64) -> (u32, u8) {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    mem.write_slice(&[0xff], GuestAddress(status)).unwrap();
    let (_, len) = process(export, chain);
    let mut s = [0u8];
    mem.read_slice(&mut s, GuestAddress(status)).unwrap();
    (len, s[0])
}

pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            u8::try_from(i % 251)
                .unwrap()
                .wrapping_mul(7)
                .wrapping_add(seed)
        })
        .collect()
}

#[test]
fn scattered_write_then_read_round_trips() {
    scattered_round_trip();
    // The same through the bounce buffer (the path for chains that cannot be lent).
    super::request::FORCE_BOUNCE.with(|f| f.set(true));
    scattered_round_trip();
    super::request::FORCE_BOUNCE.with(|f| f.set(false));
}

fn scattered_round_trip() {
    let (mem, dev, export) = setup();
    // A write: header, then 3 data buffers of odd sizes (9216 bytes), then status.
    let data = pattern(9216, 3);
    header(&mem, BUFS, 1, 8);
    let parts = [
        (BUFS + 0x1000, 1000u32),
        (BUFS + 0x3000, 7000),
        (BUFS + 0x6000, 1216),
    ];
    let mut at = 0usize;
    let mut descs = vec![desc(BUFS, 16, 0)];
    for &(a, n) in &parts {
        mem.write_slice(&data[at..at + n as usize], GuestAddress(a))
            .unwrap();
        descs.push(desc(a, n, 0));
        at += n as usize;
    }
    descs.push(desc(BUFS + 0x9000, 1, W));
    assert_eq!(run(&mem, &export, &descs, BUFS + 0x9000), (1, 0));
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 8 * 512).unwrap();
    assert_eq!(back, data);

    // A read of the same range into other scattered buffers; the status byte shares
    // the last buffer.
    header(&mem, BUFS, 0, 8);
    let descs = [
        desc(BUFS, 16, 0),
        desc(BUFS + 0x20000, 4096, W),
        desc(BUFS + 0x30000, 5120 + 1, W),
    ];
    let (len, status) = run(&mem, &export, &descs, BUFS + 0x30000 + 5120);
    assert_eq!((len, status), (9216 + 1, 0));
    let mut got = vec![0u8; 9216];
    mem.read_slice(&mut got[..4096], GuestAddress(BUFS + 0x20000))
        .unwrap();
    mem.read_slice(&mut got[4096..], GuestAddress(BUFS + 0x30000))
        .unwrap();
    assert_eq!(got, data);
}

/// Runs `descs` through the one-walk path only; `None` when it declines the chain.
fn run_fast(mem: &GuestMemoryMmap, export: &Export, descs: &[RawDescriptor]) -> Option<u32> {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    super::fast::read_or_write(export, &chain).map(|(_, len)| len)
}

fn status_at(mem: &GuestMemoryMmap, at: u64) -> u8 {
    let mut s = [0u8];
    mem.read_slice(&mut s, GuestAddress(at)).unwrap();
    s[0]
}

#[test]
fn plain_reads_and_writes_take_the_one_walk_path() {
    let (mem, dev, export) = setup();
    let data = pattern(12288, 4);
    let st = BUFS + 0x9000;
    // A write of three scattered pages: executed, the status byte set, data landed.
    header(&mem, BUFS, 1, 16);
    let pages = [BUFS + 0x1000, BUFS + 0x5000, BUFS + 0x3000];
    let mut descs = vec![desc(BUFS, 16, 0)];
    for (i, &a) in pages.iter().enumerate() {
        mem.write_slice(&data[i * 4096..(i + 1) * 4096], GuestAddress(a))
            .unwrap();
        descs.push(desc(a, 4096, 0));
    }
    descs.push(desc(st, 1, W));
    mem.write_slice(&[0xff], GuestAddress(st)).unwrap();
    assert_eq!(run_fast(&mem, &export, &descs), Some(1));
    assert_eq!(status_at(&mem, st), 0);
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 16 * 512).unwrap();
    assert_eq!(back, data);
    // Read back into two other buffers.
    header(&mem, BUFS, 0, 16);
    let read = [
        desc(BUFS, 16, 0),
        desc(BUFS + 0x20000, 8192, W),
        desc(BUFS + 0x30000, 4096, W),
        desc(st, 1, W),
    ];
    mem.write_slice(&[0xff], GuestAddress(st)).unwrap();
    assert_eq!(run_fast(&mem, &export, &read), Some(12288 + 1));
    assert_eq!(status_at(&mem, st), 0);
    let mut got = vec![0u8; 12288];
    mem.read_slice(&mut got[..8192], GuestAddress(BUFS + 0x20000))
        .unwrap();
    mem.read_slice(&mut got[8192..], GuestAddress(BUFS + 0x30000))
        .unwrap();
    assert_eq!(got, data);
    // Declined, for the general path, before touching anything: the status byte
    // sharing the data's buffer, overlapping read buffers, an out-of-range request.
    let shared = [desc(BUFS, 16, 0), desc(BUFS + 0x20000, 4097, W)];
    let overlap = [
        desc(BUFS, 16, 0),
        desc(BUFS + 0x20000, 4096, W),
        desc(BUFS + 0x20800, 4096, W),
        desc(st, 1, W),
    ];
    mem.write_slice(&[0xff], GuestAddress(st)).unwrap();
    assert_eq!(run_fast(&mem, &export, &shared), None);
    assert_eq!(run_fast(&mem, &export, &overlap), None);
    header(&mem, BUFS, 0, (1 << 20) / 512 - 1);
    assert_eq!(run_fast(&mem, &export, &read), None);
    assert_eq!(
        status_at(&mem, st),
        0xff,
        "a declined request changes nothing"
    );
}

#[test]
fn header_and_data_may_share_a_buffer() {
    let (mem, dev, export) = setup();
    let data = pattern(4096, 9);
    header(&mem, BUFS, 1, 1);
    mem.write_slice(&data, GuestAddress(BUFS + 16)).unwrap();
    let descs = [desc(BUFS, 16 + 4096, 0), desc(BUFS + 0x2000, 1, W)];
    assert_eq!(run(&mem, &export, &descs, BUFS + 0x2000), (1, 0));
    let mut back = vec![0u8; 4096];
    dev.read_at(&mut back, 512).unwrap();
    assert_eq!(back, data);
}

#[test]
fn overlapping_read_buffers_still_get_the_data() {
    // Two writable descriptors naming the same memory: no two mutable slices may alias,
    // so the request goes through the bounce buffer; the second copy wins.
    let (mem, dev, export) = setup();
    let data = pattern(8192, 5);
    dev.write_at(&data, 0).unwrap();
    header(&mem, BUFS, 0, 0);
    let descs = [
        desc(BUFS, 16, 0),
        desc(BUFS + 0x1000, 4096, W),
        desc(BUFS + 0x1800, 4096, W),
        desc(BUFS + 0x4000, 1, W),
    ];
    assert_eq!(run(&mem, &export, &descs, BUFS + 0x4000), (8193, 0));
    let mut got = vec![0u8; 6144];
    mem.read_slice(&mut got, GuestAddress(BUFS + 0x1000))
        .unwrap();
    assert_eq!(&got[..2048], &data[..2048]);
    assert_eq!(&got[2048..], &data[4096..]);
}

#[test]
fn out_of_range_and_read_only_fail_with_ioerr() {
    let (mem, _dev, export) = setup();
    header(&mem, BUFS, 0, (1 << 20) / 512 - 1);
    let descs = [
        desc(BUFS, 16, 0),
        desc(BUFS + 0x1000, 1024, W),
        desc(BUFS + 0x2000, 1, W),
    ];
    assert_eq!(run(&mem, &export, &descs, BUFS + 0x2000).1, 1);

    let (mem, dev, _) = setup();
    let ro = Export::new(
        dev,
        ExportOptions {
            read_only: true,
            ..ExportOptions::named("ro")
        },
    );
    header(&mem, BUFS, 1, 0);
    let descs = [
        desc(BUFS, 16, 0),
        desc(BUFS + 0x1000, 512, 0),
        desc(BUFS + 0x2000, 1, W),
    ];
    assert_eq!(run(&mem, &ro, &descs, BUFS + 0x2000), (1, 1));
}

/// Not a check but a measurement (ignored by default; timings are never asserted):
/// the host time (median) of read and write requests on a qcow2 file in the page cache,
/// executed straight from guest memory and through the bounce buffer, in one run:
/// `cargo test --release -p diskimg-serve --lib request_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn request_cost() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cost.qcow2");
    let size: u64 = 64 << 20;
    let s: Arc<dyn diskimg_blockio::Storage> =
        Arc::new(diskimg_blockio::FileStorage::create(&path).unwrap());
    diskimg_qcow2::DRIVER
        .create(s.clone(), &mut CreateRequest::new(size, OptionList::new()))
        .unwrap();
    let dev = diskimg_qcow2::DRIVER.open(s, &OpenOptions::new()).unwrap();
    let fill = vec![0x5au8; 1 << 20];
    for off in (0..size).step_by(fill.len()) {
        dev.write_at(&fill, off).unwrap();
    }
    let export = Export::new(dev, ExportOptions::named("cost"));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    mem.write_slice(&fill, GuestAddress(1 << 20)).unwrap();
    println!("| request | straight from guest memory (µs) | bounce buffer (µs) |");
    println!("|---|---|---|");
    for (ty, name) in [(1u32, "write"), (0, "read")] {
        for len in [4096u32, 1 << 20] {
            let flags = if ty == 0 { W } else { 0 };
            let descs = [
                desc(BUFS, 16, 0),
                desc(1 << 20, len, flags),
                desc(BUFS + 0x100, 1, W),
            ];
            // The two paths alternate request by request; the medians resist the
            // preemptions of a busy machine.
            let n = if len > 4096 { 400 } else { 10_000 };
            let mut times = [Vec::new(), Vec::new()];
            for i in 0..n {
                let bounce = i % 2 == 1;
                super::request::FORCE_BOUNCE.with(|f| f.set(bounce));
                let sector = (i * 7919 % (size / u64::from(len))) * u64::from(len) / 512;
                header(&mem, BUFS, ty, sector);
                let t = Instant::now();
                assert_eq!(run(&mem, &export, &descs, BUFS + 0x100).1, 0);
                times[usize::from(bounce)].push(t.elapsed().as_secs_f64() * 1e6);
            }
            let per = times.map(|mut t| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            });
            println!(
                "| {name} {} KiB | {:.1} | {:.1} |",
                len / 1024,
                per[0],
                per[1]
            );
        }
    }
    super::request::FORCE_BOUNCE.with(|f| f.set(false));
}
