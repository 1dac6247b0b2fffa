//! Crash consistency: cut the storage at every write and flush of a workload; the image
//! must open, `qemu-img check` must find no corruption (leaks are fine), and everything
//! flushed before the cut must read back.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, CreateRequest, Driver, FaultStorage, MemStorage, OpenOptions,
    OptionList, RepairMode, Storage, ZeroFlags,
};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{Model, pattern, read_all, tempdir};

use crate::crash_harness::{Judge, image};

const SIZE: u64 = 1 << 20;

fn ops() -> Vec<(u64, u64, u8)> {
    // (offset, len, kind/byte): kind 0 = zero, 1 = discard, 2 = compressed, else write.
    vec![
        (0, 8192, 7),
        (5000, 300, 8),
        (65536, 20000, 9),
        (4096, 8192, 0),
        (300_000, 200_000, 10),
        (262_144, 65536, 1),
        (600_000, 4096, 2),
        (700_000, 1, 11),
        (65536, 4096, 0),
        (900_000, 100_000, 12),
    ]
}

fn apply(
    dev: &dyn BlockDevice,
    m: &mut Model,
    (o, l, k): (u64, u64, u8),
) -> diskimg_blockio::Result<()> {
    match k {
        0 => dev.write_zeroes(o, l, ZeroFlags { may_unmap: true })?,
        1 => dev.discard(o, l)?,
        2 => {
            let g = dev.compressed_write_granularity().unwrap();
            let start = o / g * g;
            let buf = vec![0x44u8; g as usize];
            dev.write_compressed(&buf, start)?;
            m.write(start as usize, &buf);
            return Ok(());
        }
        b => dev.write_at(&vec![b; l as usize], o)?,
    }
    match k {
        0 | 1 => m.zero(o as usize, l as usize),
        b => m.write(o as usize, &vec![b; l as usize]),
    }
    Ok(())
}

fn crash_all_cuts(options: &str, flush_every: usize) {
    crash_all_cuts_with(options, flush_every, false);
}

/// With `backed`, the image sits on a raw base of pattern data (copy-on-write paths).
fn crash_all_cuts_with(options: &str, flush_every: usize, backed: bool) {
    let dir = tempdir();
    let base_bytes = if backed {
        pattern(3, SIZE as usize)
    } else {
        vec![0u8; SIZE as usize]
    };
    std::fs::write(dir.path().join("base.raw"), &base_bytes).unwrap();
    let backing = || -> Option<Arc<dyn BlockDevice>> {
        backed.then(|| {
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(base_bytes.clone()));
            diskimg_raw::DRIVER
                .open(s, &OpenOptions::new().read_only(true))
                .unwrap()
        })
    };
    let options = if backed {
        format!("{options},backing_file=base.raw,backing_fmt=raw")
    } else {
        options.to_string()
    };
    let initial = image(SIZE, &options);

    // A run cut at `cut` (or not: then nothing may fail): the storage, the model at the
    // last completed flush and the ranges touched since (whole clusters and more).
    let run = |cut: Option<u64>| {
        let fs = Arc::new(FaultStorage::new(initial.clone(), cut));
        let dev = DRIVER.open(fs.clone(), &OpenOptions::new()).unwrap();
        dev.set_backing(backing()).unwrap();
        let mut m = Model {
            bytes: base_bytes.clone(),
        };
        let mut durable = m.clone();
        let mut touched_after: Vec<(u64, u64)> = Vec::new();
        let n_ops = ops().len();
        for (k, op) in ops().into_iter().enumerate() {
            let g = 65536u64;
            touched_after.push((op.0 / g * g, op.1 + g));
            let r = apply(dev.as_ref(), &mut m, op);
            if r.is_err() {
                assert!(cut.is_some(), "{r:?}");
                break;
            }
            if (k + 1) % flush_every == 0 || k + 1 == n_ops {
                let r = dev.flush();
                if r.is_err() {
                    assert!(cut.is_some(), "{r:?}");
                    break;
                }
                durable = m.clone();
                touched_after.clear();
            }
        }
        (fs, durable, touched_after)
    };
    let count = run(None).0.ops();
    assert!(count > 20, "{count}");
    let path = dir.path().join("crash.qcow2");
    let set_backing = |dev: &dyn BlockDevice| dev.set_backing(backing()).unwrap();
    let judge = Judge {
        prepare: Some(&set_backing),
        ..Judge::new(&path, 4, CrashMode::DropUnflushed)
    };
    for cut in 0..count {
        let (fs, durable, touched_after) = run(Some(cut));
        assert!(fs.crashed());
        // Our own check on every cut and mode; qemu-img check (a process each) on every
        // fourth cut for the modes that keep unflushed writes.
        judge.images(&fs, cut, |c| {
            if c.report.leaks > 0 && cut % 16 == 0 && judge.qemu_judges(cut, c.mode) {
                // Our check counts the same leaks as qemu's, and repairs them.
                let fixed = crate::open(&path, false).check(RepairMode::Leaks).unwrap();
                assert_eq!(fixed.leaks_fixed, c.report.leaks);
                diskimg_testutil::assert_qemu_check_clean(&path, "qcow2");
            }
            let got = read_all(c.dev);
            let mut want = durable.bytes.clone();
            let mut got_masked = got.clone();
            for (o, l) in &touched_after {
                let end = (*o + *l).min(SIZE) as usize;
                want[*o as usize..end].fill(0);
                got_masked[*o as usize..end].fill(0);
            }
            assert!(got_masked == want, "{}: flushed data lost", c.what);
        });
    }
}

#[test]
fn crash_at_every_write_and_flush_v3() {
    crash_all_cuts("cluster_size=4k", 1);
}

#[test]
fn crash_during_copy_on_write_from_a_backing_file() {
    crash_all_cuts_with("cluster_size=4k", 2, true);
    crash_all_cuts_with("cluster_size=16k,extended_l2=on", 1, true);
}

#[test]
fn crash_with_metadata_deferred_over_several_writes() {
    crash_all_cuts("cluster_size=512,refcount_bits=64", 4);
}

#[test]
fn crash_at_every_write_and_flush_extended_l2_small_refcounts() {
    crash_all_cuts("cluster_size=16k,extended_l2=on,refcount_bits=2", 1);
}

/// `amend -o refcount_bits=N` cut at every write and flush: the image is never corrupt
/// (old structures may leak), keeps its data, and has one width or the other.
#[test]
fn crash_during_refcount_width_change() {
    let base: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::parse("cluster_size=4k").unwrap());
    DRIVER.create(base.clone(), &mut req).unwrap();
    let dev = diskimg_qcow2::Qcow2Device::open(base.clone(), &OpenOptions::new()).unwrap();
    let data = pattern(5, SIZE as usize / 2);
    dev.write_at(&data, 4096).unwrap();
    dev.write_compressed(&pattern(6, 4096), SIZE - 8192)
        .unwrap();
    dev.flush().unwrap();
    let want = read_all(&dev);
    drop(dev);
    let mut initial = vec![0u8; base.len().unwrap() as usize];
    base.read_exact_at(&mut initial, 0).unwrap();
    let amend = |s: Arc<FaultStorage>| -> diskimg_blockio::Result<()> {
        let dev = diskimg_qcow2::Qcow2Device::open(s, &OpenOptions::new())?;
        dev.amend(&OptionList::parse("refcount_bits=4").unwrap())
    };
    let count = {
        let fs = Arc::new(FaultStorage::new(initial.clone(), None));
        amend(fs.clone()).unwrap();
        fs.ops()
    };
    assert!(count > 4, "{count}");
    let mut widths = std::collections::BTreeSet::new();
    let judge = Judge::ours_only();
    for cut in 0..=count {
        let fs = Arc::new(FaultStorage::new(initial.clone(), Some(cut)));
        let _ = amend(fs.clone());
        judge.images(&fs, cut, |c| {
            widths.insert(u32::from_be_bytes(c.img[96..100].try_into().unwrap()));
            assert!(read_all(c.dev) == want, "{}: data changed", c.what);
        });
    }
    // Both the old width (order 4) and the new one (order 2) were seen.
    assert_eq!(widths.into_iter().collect::<Vec<_>>(), vec![2, 4]);
}
