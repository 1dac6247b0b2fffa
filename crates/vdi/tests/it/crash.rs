//! Crash consistency: cut a workload at every storage operation, then the image must open,
//! pass qemu-img check (leaks are fine) and hold everything flushed before the cut.

use std::sync::Arc;

use diskimg_blockio::{
    CrashMode, Driver, FaultStorage, MemStorage, OpenOptions, Storage, ZeroFlags,
};
use diskimg_testutil::{Model, assert_qemu_check_clean, read_all, tempdir};

fn base_image(opts: &str, size: u64) -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut req = diskimg_blockio::CreateRequest::new(
        size,
        diskimg_blockio::OptionList::parse(opts).unwrap(),
    );
    let st: Arc<dyn Storage> = s.clone();
    diskimg_vdi::DRIVER.create(st, &mut req).unwrap();
    s.to_vec()
}

enum Op {
    Write(u64, usize, u8),
    Zero(u64, u64),
    Flush,
}

fn workload() -> Vec<Op> {
    use Op::*;
    vec![
        Write(100, 5000, 1),
        Write(3 << 20, 1 << 20, 2),
        Flush,
        Write((1 << 20) - 10, 20, 3),
        Zero(50, 100),
        Write(5 << 20, 300, 4),
        Flush,
        Write(200, 100, 5),
        Write(7 << 20, 4096, 6),
        Write((2 << 20) + 7, (2 << 20) + 5, 7),
        Flush,
        Write(6 << 20, 10, 8),
    ]
}

/// Runs the workload until it fails; returns the model at the last successful flush and
/// which bytes were written (or attempted) after it.
fn run(storage: Arc<FaultStorage>, size: u64) -> (Model, Vec<bool>) {
    let mut model = Model::zeroed(size as usize);
    let mut durable = model.clone();
    let mut touched = vec![false; size as usize];
    let st: Arc<dyn Storage> = storage;
    let Ok(dev) = diskimg_vdi::DRIVER.open(st, &OpenOptions::new()) else {
        return (durable, touched);
    };
    for op in workload() {
        let r = match op {
            Op::Write(off, len, pat) => {
                touched[off as usize..off as usize + len].fill(true);
                let r = dev.write_at(&vec![pat; len], off);
                model.write(off as usize, &vec![pat; len]);
                r
            }
            Op::Zero(off, len) => {
                touched[off as usize..(off + len) as usize].fill(true);
                let r = dev.write_zeroes(off, len, ZeroFlags::default());
                model.zero(off as usize, len as usize);
                r
            }
            Op::Flush => {
                let r = dev.flush();
                if r.is_ok() {
                    durable = model.clone();
                    touched.fill(false);
                }
                r
            }
        };
        if r.is_err() {
            break;
        }
    }
    (durable, touched)
}

#[test]
fn crash_at_every_operation() {
    let dir = tempdir();
    let size = 8u64 << 20;
    for opts in ["", "static=on"] {
        let base = base_image(opts, size);
        let counter = Arc::new(FaultStorage::new(base.clone(), None));
        let (full, _) = run(counter.clone(), size);
        let total = counter.ops();
        assert!(total > 10, "{total}");
        for cut in 0..=total {
            for mode in [
                CrashMode::KeepAll,
                CrashMode::DropUnflushed,
                CrashMode::Random(cut * 31 + 1),
            ] {
                let fs = Arc::new(FaultStorage::new(base.clone(), Some(cut)));
                let (durable, touched) = run(fs.clone(), size);
                let img = fs.crash_image(mode);
                let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
                let dev = diskimg_vdi::DRIVER
                    .open(s, &OpenOptions::new().read_only(true))
                    .unwrap_or_else(|e| panic!("cut {cut} {mode:?}: {e}"));
                let got = read_all(dev.as_ref());
                // Every byte flushed before the cut reads back, unless a later
                // (unflushed) write may have changed it.
                for (i, (&g, &d)) in got.iter().zip(durable.bytes.iter()).enumerate() {
                    assert!(
                        g == d || touched[i],
                        "cut {cut} {mode:?}: byte {i} is {g}, flushed {d}"
                    );
                }
                let r = dev.check(diskimg_blockio::RepairMode::None).unwrap();
                assert_eq!(r.corruptions, 0, "cut {cut} {mode:?}: {:?}", r.messages);
                // qemu agrees (sampled: qemu-img is slow to spawn).
                if cut % 7 == 0 && matches!(mode, CrashMode::Random(_)) {
                    let p = dir.path().join("crash.vdi");
                    std::fs::write(&p, &img).unwrap();
                    assert_qemu_check_clean(&p, "vdi");
                }
            }
        }
        assert_eq!(full.bytes.len(), size as usize);
    }
}

#[test]
fn crash_during_resize_keeps_old_or_new_image() {
    let dir = tempdir();
    for opts in ["", "static=on"] {
        let base = base_image(opts, 3 << 20);
        // Data in block 0, which the grown block map displaces.
        let setup = Arc::new(MemStorage::from_vec(base));
        let st: Arc<dyn Storage> = setup.clone();
        let dev = diskimg_vdi::DRIVER.open(st, &OpenOptions::new()).unwrap();
        dev.write_at(&[0x5a; 5000], 1000).unwrap();
        dev.write_at(&[0x6b; 100], (2 << 20) + 5).unwrap();
        dev.flush().unwrap();
        let expect = read_all(dev.as_ref());
        drop(dev);
        let base = setup.to_vec();
        // 130 blocks need a second block map sector: block 0's data must move.
        let new_size = 130u64 << 20;
        let grow = |fs: Arc<FaultStorage>| {
            let st: Arc<dyn Storage> = fs;
            let dev = diskimg_vdi::DRIVER.open(st, &OpenOptions::new())?;
            dev.resize(new_size, diskimg_blockio::Preallocation::Off, false)
        };
        let counter = Arc::new(FaultStorage::new(base.clone(), None));
        grow(counter.clone()).unwrap();
        let total = counter.ops();
        for cut in 0..=total {
            for mode in [
                CrashMode::KeepAll,
                CrashMode::DropUnflushed,
                CrashMode::Random(cut + 3),
            ] {
                let fs = Arc::new(FaultStorage::new(base.clone(), Some(cut)));
                let _ = grow(fs.clone());
                let img = fs.crash_image(mode);
                let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
                let dev = diskimg_vdi::DRIVER
                    .open(s, &OpenOptions::new().read_only(true))
                    .unwrap_or_else(|e| panic!("{opts} cut {cut} {mode:?}: {e}"));
                let size = dev.virtual_size();
                assert!(size == 3 << 20 || size == new_size, "{size}");
                let mut got = vec![0u8; expect.len() + (1 << 20)];
                let n = got.len().min(size as usize);
                dev.read_at(&mut got[..n], 0).unwrap();
                assert_eq!(got[..expect.len()], expect[..], "{opts} cut {cut} {mode:?}");
                assert!(got[expect.len()..].iter().all(|&b| b == 0));
                let mut tail = vec![1u8; 1 << 20];
                dev.read_at(&mut tail, size - (1 << 20)).unwrap();
                assert!(size == 3 << 20 || tail.iter().all(|&b| b == 0));
                let r = dev.check(diskimg_blockio::RepairMode::None).unwrap();
                assert_eq!(
                    r.corruptions, 0,
                    "{opts} cut {cut} {mode:?}: {:?}",
                    r.messages
                );
                if matches!(mode, CrashMode::Random(_)) {
                    let p = dir.path().join("crash.vdi");
                    std::fs::write(&p, &img).unwrap();
                    assert_qemu_check_clean(&p, "vdi");
                }
            }
        }
    }
}

/// New blocks reach the on-disk map at the next flush, in one metadata write after one
/// data flush, whatever their number (they were one flush and one map write each).
#[test]
fn block_allocations_are_committed_once_per_flush() {
    let mib = 1u64 << 20;
    let img = base_image("", 64 * mib);
    let fs = Arc::new(FaultStorage::new(img.clone(), None));
    let dev = diskimg_vdi::DRIVER
        .open(fs.clone(), &OpenOptions::new())
        .unwrap();
    dev.write_at(&[1; 512], 0).unwrap();
    let first = fs.ops();
    for k in 1..40u64 {
        dev.write_at(&[k as u8; 4096], k * mib + 512).unwrap();
    }
    // The block's data (and the zeroes completing it) only: no flush, no map write.
    assert_eq!(fs.ops() - first, 2 * 39);
    // Unflushed: a crash now keeps the old map (the blocks are unreferenced).
    let lost = fs.crash_image(CrashMode::KeepAll);
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(lost));
    let old = diskimg_vdi::DRIVER
        .open(s, &OpenOptions::new().read_only(true))
        .unwrap();
    assert!(
        read_all(old.as_ref())[mib as usize..]
            .iter()
            .all(|&b| b == 0)
    );
    let before_flush = fs.ops();
    dev.flush().unwrap();
    // flush (data), the header and map in one write, flush.
    assert_eq!(fs.ops() - before_flush, 3);
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(
        fs.crash_image(CrashMode::DropUnflushed),
    ));
    let new = diskimg_vdi::DRIVER
        .open(s, &OpenOptions::new().read_only(true))
        .unwrap();
    let bytes = read_all(new.as_ref());
    for k in 1..40u64 {
        let at = (k * mib + 512) as usize;
        assert!(
            bytes[at..at + 4096].iter().all(|&b| b == k as u8),
            "block {k}"
        );
    }
    assert_eq!(new.check(Default::default()).unwrap().corruptions, 0);
}
