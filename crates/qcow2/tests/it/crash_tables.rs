//! Crash consistency of deferred L2 tables (`x-deferred-tables=on`): new L2 tables wait in
//! the cache and go out, whole, with the other deferred metadata, one storage flush before
//! all their L1 entries. Small clusters (512 bytes: one L2 table per 32 KiB of guest, one
//! refcount block per 128 KiB of host) make every few writes need a new table. The storage
//! is cut at every operation; under every crash mode the image must have no corruption
//! (our check and `qemu-img check`, with the same leaks), and every block must read either
//! what it held at the last completed flush or what was written to it since.

use std::sync::Arc;

use diskimg_blockio::{CrashMode, Driver, FaultStorage, MemStorage, OpenOptions, Storage};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{assert_qemu_check_clean, read_all, tempdir};

use crate::crash_harness::{Judge, Workload, Write, image};

const SIZE: u64 = 1 << 20;
const CLUSTER: usize = 512;
/// Guest bytes one L2 table maps (64 entries of 512-byte clusters).
const L2_SPAN: u64 = 32 << 10;

/// Whole-cluster runs and partial clusters spread over many L2 ranges, some ranges
/// written again.
fn ops() -> Vec<Write> {
    let mut v = Vec::new();
    for k in 0..36u64 {
        let table = (k * 7) % (SIZE / L2_SPAN);
        let inside = (k * 3 % 60) * CLUSTER as u64;
        let len = if k % 3 == 0 { 3 * CLUSTER } else { CLUSTER };
        v.push(Write {
            off: table * L2_SPAN + inside,
            len,
            byte: 1 + k as u8,
        });
    }
    v.push(Write {
        off: 5 * L2_SPAN - 256,
        len: 1024,
        byte: 0xee,
    });
    v
}

fn deferred(on: bool) -> OpenOptions {
    let mut o = OpenOptions::new();
    if on {
        o.driver_options.set("x-deferred-tables", "on");
    }
    o
}

/// Cut at every operation of the workload with a flush every `every` writes: our check
/// on every image, `qemu-img check` on every fourth cut (but for images that keep every
/// write), old or new data in every 256 bytes.
fn crash_every_cut(every: usize) {
    let w = Workload {
        initial: image(SIZE, "cluster_size=512"),
        size: SIZE,
        ops: ops(),
        every,
        open: deferred(true),
    };
    let dir = tempdir();
    let path = dir.path().join("crash.qcow2");
    let judge = Judge::new(&path, 4, CrashMode::KeepAll);
    w.crash_every_cut(&path, 60, 256, &judge, |p| {
        assert_qemu_check_clean(p, "qcow2")
    });
}

#[test]
fn crash_with_deferred_tables_flush_every_5() {
    crash_every_cut(5);
}

#[test]
fn crash_with_deferred_tables_flush_only_at_close() {
    crash_every_cut(usize::MAX);
}

/// Storage flushes for allocating writes into 16 fresh L2 ranges and one guest flush:
/// one per new table in qemu's order, a few with deferred tables; same guest content.
#[test]
fn deferred_tables_save_flushes() {
    let initial = image(SIZE, "cluster_size=512");
    let mut images = Vec::new();
    let mut flushes = Vec::new();
    for on in [false, true] {
        let fs = Arc::new(FaultStorage::new(initial.clone(), None));
        let dev = DRIVER.open(fs.clone(), &deferred(on)).unwrap();
        for k in 0..16u64 {
            dev.write_at(&[k as u8 + 1; 2 * CLUSTER], k * 2 * L2_SPAN)
                .unwrap();
        }
        dev.flush().unwrap();
        flushes.push(fs.flushes());
        dev.close().unwrap();
        images.push(fs.crash_image(CrashMode::DropUnflushed));
    }
    assert!(flushes[0] >= 16, "{flushes:?}");
    assert!(flushes[1] <= 6, "{flushes:?}");
    let read = |img: &Vec<u8>| {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
        read_all(
            DRIVER
                .open(s, &OpenOptions::new().read_only(true))
                .unwrap()
                .as_ref(),
        )
    };
    assert!(read(&images[0]) == read(&images[1]));
    let dir = tempdir();
    let path = dir.path().join("t.qcow2");
    std::fs::write(&path, &images[1]).unwrap();
    assert_qemu_check_clean(&path, "qcow2");
}
