//! Crash consistency of allocating writes through the cluster reserve (one storage
//! flush per guest flush): cut the storage at every operation of a workload of small
//! writes into fresh clusters; under every crash mode the image must have no
//! corruption (our check and `qemu-img check`), and every 4 KiB block must read either
//! what it held at the last completed flush or what was written to it since — never
//! anything else (no stale or lost data outside the writes).

use std::sync::Arc;

use diskimg_blockio::{CrashMode, Driver, FaultStorage, OpenOptions};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::tempdir;

use crate::crash_harness::{Judge, Workload, Write, assert_qemu_no_leaks_or_corruptions};

const SIZE: u64 = 4 << 20;
const BLOCK: usize = 4096;
const CLUSTER: u64 = 65536;

/// Blocks into fresh clusters (some twice, some at the end of a cluster, one spanning
/// two clusters), then into clusters that already hold data.
fn ops() -> Vec<Write> {
    let block = |off, byte| Write {
        off,
        len: BLOCK,
        byte,
    };
    let mut v = Vec::new();
    for k in 0..40u64 {
        let c = (k * 37) % (SIZE / CLUSTER);
        let inside = (k * 5 % 16) * BLOCK as u64;
        v.push(block(c * CLUSTER + inside, 1 + (k % 200) as u8));
    }
    v.push(block(3 * CLUSTER - BLOCK as u64, 0xee));
    v.push(block(5 * CLUSTER + 8192, 0xdd));
    v
}

/// A new 4 MiB image with 64 KiB clusters.
pub(crate) fn image() -> Vec<u8> {
    crate::crash_harness::image(SIZE, "")
}

/// Cut at every operation of the workload with a flush every `every` writes: our check
/// on every image, `qemu-img check` on every third cut (but for images that drop the
/// unflushed writes), old or new data in every block. A clean run ends with no leaks:
/// the reserve goes back at close.
fn crash_every_cut(every: usize) {
    let w = Workload {
        initial: image(),
        size: SIZE,
        ops: ops(),
        every,
        open: OpenOptions::new(),
    };
    let dir = tempdir();
    let path = dir.path().join("crash.qcow2");
    let judge = Judge::new(&path, 3, CrashMode::DropUnflushed);
    w.crash_every_cut(
        &path,
        40,
        BLOCK,
        &judge,
        assert_qemu_no_leaks_or_corruptions,
    );
}

#[test]
fn crash_during_allocating_writes_flush_every_4() {
    crash_every_cut(4);
}

#[test]
fn crash_during_allocating_writes_flush_every_16() {
    crash_every_cut(16);
}

/// The reserve is used (one storage flush per guest flush after the first) and given
/// back at close (the file does not keep it).
#[test]
fn reserve_saves_flushes_and_is_returned_at_close() {
    let initial = image();
    let fs = Arc::new(FaultStorage::new(initial.clone(), None));
    let dev = DRIVER.open(fs.clone(), &OpenOptions::new()).unwrap();
    let mut flushes = Vec::new();
    for k in 0..32u64 {
        dev.write_at(&[7u8; BLOCK], k * CLUSTER).unwrap();
        if k % 8 == 7 {
            let before = fs.flushes();
            dev.flush().unwrap();
            flushes.push(fs.flushes() - before);
        }
    }
    // The first group orders its refcounts with a flush of its own; later ones use
    // clusters allocated ahead and need only the guest's.
    assert_eq!(flushes, vec![2, 1, 1, 1], "storage flushes per guest flush");
    dev.close().unwrap();
    let img = fs.crash_image(CrashMode::DropUnflushed);
    // 32 data clusters, the header, L1, refcount table and block, one L2 table: the
    // reserve left no tail behind.
    assert!(img.len() as u64 <= 37 * CLUSTER, "{}", img.len());
}
