//! Crash consistency: cut a workload at every storage write/flush, reopen the crash
//! image in every mode; it opens (here and in qemu), has no corruption, and data
//! flushed before the cut reads back.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, CreateRequest, Driver, FaultStorage, MemStorage, OpenOptions,
    OptionList, RepairMode, Storage,
};
use diskimg_testutil::{pattern, qemu_read_raw, read_all, tempdir};

const SIZE: u64 = 6 << 20;

fn fresh(opts: &str) -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::parse(opts).unwrap());
    diskimg_vhd::DRIVER.create(s.clone(), &mut req).unwrap();
    let mut v = vec![0u8; s.len().unwrap() as usize];
    s.read_exact_at(&mut v, 0).unwrap();
    v
}

/// The workload: writes into new and existing blocks, a flush after each step.
/// Returns the model after each completed flush.
fn workload(dev: &dyn BlockDevice, models: &mut Vec<Vec<u8>>) -> diskimg_blockio::Result<()> {
    let size = dev.virtual_size() as usize;
    let mut m = vec![0u8; size];
    let steps: [(u64, usize); 5] = [
        (1000, 5000),
        (2_097_100, 4096),
        (0, 512),
        (4_500_000, 70_000),
        (1_000_000, 1_200_000),
    ];
    for (i, (off, len)) in steps.into_iter().enumerate() {
        let d = pattern(i as u64 + 3, len);
        dev.write_at(&d, off)?;
        m[off as usize..off as usize + len].copy_from_slice(&d);
        dev.flush()?;
        models.push(m.clone());
    }
    Ok(())
}

#[test]
fn crash_at_every_operation() {
    let dir = tempdir();
    let init = fresh("");
    // Count operations of an uninterrupted run.
    let total = {
        let fs = Arc::new(FaultStorage::new(init.clone(), None));
        let dev = diskimg_vhd::DRIVER
            .open(fs.clone(), &OpenOptions::new())
            .unwrap();
        workload(dev.as_ref(), &mut Vec::new()).unwrap();
        fs.ops()
    };
    assert!(total > 10);
    for cut in 0..total {
        for mode in [
            CrashMode::KeepAll,
            CrashMode::DropUnflushed,
            CrashMode::Random(cut),
        ] {
            let fs = Arc::new(FaultStorage::new(init.clone(), Some(cut)));
            let dev = diskimg_vhd::DRIVER
                .open(fs.clone(), &OpenOptions::new())
                .unwrap();
            let mut models = Vec::new();
            let _ = workload(dev.as_ref(), &mut models);
            drop(dev);
            let img = fs.crash_image(mode);
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
            let dev = diskimg_vhd::DRIVER
                .open(s, &OpenOptions::new())
                .unwrap_or_else(|e| panic!("cut {cut} {mode:?}: {e}"));
            let r = dev.check(RepairMode::None).unwrap();
            assert_eq!(r.corruptions, 0, "cut {cut} {mode:?}: {r:?}");
            let got = read_all(dev.as_ref());
            let zeros = vec![0u8; got.len()];
            let last = models.last().unwrap_or(&zeros);
            assert!(
                flushed_prefix_ok(&got, last, models.len()),
                "cut {cut} {mode:?}"
            );
            if cut % 7 == 0 && mode == CrashMode::Random(cut) {
                let p = dir.path().join("crash.vhd");
                std::fs::write(&p, &img).unwrap();
                assert_eq!(qemu_read_raw(&p, "vpc").len(), got.len());
                assert_eq!(
                    qemu_read_raw(&p, "vpc"),
                    got,
                    "qemu reads the crash image differently"
                );
            }
        }
    }
}

/// Bytes written by flushed steps must read back, except where a later (unflushed)
/// step of the workload wrote.
fn flushed_prefix_ok(got: &[u8], flushed: &[u8], done_steps: usize) -> bool {
    let steps: [(usize, usize); 5] = [
        (1000, 5000),
        (2_097_100, 4096),
        (0, 512),
        (4_500_000, 70_000),
        (1_000_000, 1_200_000),
    ];
    let later: Vec<(usize, usize)> = steps[done_steps.min(5)..].to_vec();
    got.iter()
        .zip(flushed)
        .enumerate()
        .all(|(i, (a, b))| a == b || later.iter().any(|&(o, l)| i >= o && i < o + l))
}
