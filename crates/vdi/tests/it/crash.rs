//! Crash consistency: cut a workload at every storage operation, then the image must open,
//! pass qemu-img check (leaks are fine) and hold everything flushed before the cut
//! (the sweep: `diskimg_testutil::crash`).

use std::sync::Arc;

use diskimg_blockio::{
    CrashMode, Driver, FaultStorage, MemStorage, OpenOptions, RepairMode, Storage, ZeroFlags,
};
use diskimg_testutil::crash::{Durable, count_ops, open_image, sweep};
use diskimg_testutil::{assert_qemu_check_clean, read_all, tempdir};

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

/// Runs the workload until it fails; returns what the guest held at the last successful
/// flush and which bytes were written (or attempted) after it.
fn run(storage: Arc<FaultStorage>, size: u64) -> Durable {
    let mut guest = Durable::new(vec![0; size as usize]);
    let st: Arc<dyn Storage> = storage;
    let Ok(dev) = diskimg_vdi::DRIVER.open(st, &OpenOptions::new()) else {
        return guest;
    };
    for op in workload() {
        let r = match op {
            Op::Write(off, len, pat) => {
                guest.write(off, &vec![pat; len]);
                dev.write_at(&vec![pat; len], off)
            }
            Op::Zero(off, len) => {
                guest.zero(off, len);
                dev.write_zeroes(off, len, ZeroFlags::default())
            }
            Op::Flush => {
                let r = dev.flush();
                if r.is_ok() {
                    guest.flushed();
                }
                r
            }
        };
        if r.is_err() {
            break;
        }
    }
    guest
}

#[test]
fn crash_at_every_operation() {
    let dir = tempdir();
    let size = 8u64 << 20;
    let ro = OpenOptions::new().read_only(true);
    for opts in ["", "static=on"] {
        let base = base_image(opts, size);
        let total = count_ops(&base, |fs| {
            run(fs, size);
        });
        assert!(total > 10, "{total}");
        sweep(
            &base,
            0..=total,
            |cut| cut * 31 + 1,
            |fs| run(fs, size),
            |c| {
                let what = format!("{opts} {}", c.what());
                let dev = open_image(&diskimg_vdi::DRIVER, &c.img, &ro, &what);
                // Every byte flushed before the cut reads back, unless a later (unflushed)
                // write may have changed it.
                c.ran.assert_holds(&read_all(dev.as_ref()), &what);
                let r = dev.check(RepairMode::None).unwrap();
                assert_eq!(r.corruptions, 0, "{what}: {:?}", r.messages);
                // qemu agrees (sampled: qemu-img is slow to spawn).
                if c.cut % 7 == 0 && matches!(c.mode, CrashMode::Random(_)) {
                    let p = dir.path().join("crash.vdi");
                    std::fs::write(&p, &c.img).unwrap();
                    assert_qemu_check_clean(&p, "vdi");
                }
            },
        );
    }
}

#[test]
fn crash_during_resize_keeps_old_or_new_image() {
    let dir = tempdir();
    let ro = OpenOptions::new().read_only(true);
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
        let total = count_ops(&base, |fs| grow(fs).unwrap());
        sweep(
            &base,
            0..=total,
            |cut| cut + 3,
            grow,
            |c| {
                let what = format!("{opts} {}", c.what());
                let dev = open_image(&diskimg_vdi::DRIVER, &c.img, &ro, &what);
                let size = dev.virtual_size();
                assert!(size == 3 << 20 || size == new_size, "{size}");
                let mut got = vec![0u8; expect.len() + (1 << 20)];
                let n = got.len().min(size as usize);
                dev.read_at(&mut got[..n], 0).unwrap();
                assert_eq!(got[..expect.len()], expect[..], "{what}");
                assert!(got[expect.len()..].iter().all(|&b| b == 0));
                let mut tail = vec![1u8; 1 << 20];
                dev.read_at(&mut tail, size - (1 << 20)).unwrap();
                assert!(size == 3 << 20 || tail.iter().all(|&b| b == 0));
                let r = dev.check(RepairMode::None).unwrap();
                assert_eq!(r.corruptions, 0, "{what}: {:?}", r.messages);
                if matches!(c.mode, CrashMode::Random(_)) {
                    let p = dir.path().join("crash.vdi");
                    std::fs::write(&p, &c.img).unwrap();
                    assert_qemu_check_clean(&p, "vdi");
                }
            },
        );
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
    let ro = OpenOptions::new().read_only(true);
    let lost = fs.crash_image(CrashMode::KeepAll);
    let old = open_image(&diskimg_vdi::DRIVER, &lost, &ro, "unflushed");
    assert!(
        read_all(old.as_ref())[mib as usize..]
            .iter()
            .all(|&b| b == 0)
    );
    let before_flush = fs.ops();
    dev.flush().unwrap();
    // flush (data), the header and map in one write, flush.
    assert_eq!(fs.ops() - before_flush, 3);
    let flushed = fs.crash_image(CrashMode::DropUnflushed);
    let new = open_image(&diskimg_vdi::DRIVER, &flushed, &ro, "flushed");
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
