//! Crash consistency: cut the workload at every storage operation, reopen the crash
//! image in every mode, qemu-img check it and find the flushed data.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, CreateRequest, Driver, FaultStorage, MemStorage, OpenOptions,
    OptionList, Storage,
};
use diskimg_testutil::{assert_qemu_check_clean, pattern, read_all, tempdir};

const SIZE: u64 = 2 << 20;

fn fresh_image() -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::parse("zeroed_grain=on").unwrap())
        .image_name("c.vmdk");
    diskimg_vmdk::DRIVER.create(s.clone(), &mut req).unwrap();
    s.to_vec()
}

/// Runs the workload; returns the regions (offset, data) durable after each flush.
/// `pending` collects every region attempted since the last flush (they may or may not
/// have survived a crash).
fn workload(
    dev: &dyn BlockDevice,
    flushed: &mut Vec<(u64, Vec<u8>)>,
    pending: &mut Vec<(u64, Vec<u8>)>,
) -> diskimg_blockio::Result<()> {
    let steps: &[(u64, usize)] = &[
        (0, 4096),
        (70_000, 1000),
        (1 << 20, 65536),
        (200_000, 100),
        (1_500_000, 200_000),
    ];
    for (i, (off, len)) in steps.iter().enumerate() {
        let data = pattern(i as u64 + 1, *len);
        pending.push((*off, data.clone()));
        dev.write_at(&data, *off)?;
        if i % 2 == 1 {
            dev.flush()?;
            flushed.append(pending);
        }
    }
    pending.push((1 << 20, vec![0; 65536]));
    dev.write_zeroes(1 << 20, 65536, Default::default())?;
    dev.flush()?;
    flushed.append(pending);
    Ok(())
}

#[test]
fn crash_at_every_operation() {
    let initial = fresh_image();
    let counter = Arc::new(FaultStorage::new(initial.clone(), None));
    let dev = diskimg_vmdk::DRIVER
        .open(counter.clone(), &OpenOptions::new())
        .unwrap();
    workload(dev.as_ref(), &mut Vec::new(), &mut Vec::new()).unwrap();
    let total = counter.ops();
    assert!(total > 10, "{total}");
    let dir = tempdir();
    for cut in 0..total {
        for mode in [
            CrashMode::KeepAll,
            CrashMode::DropUnflushed,
            CrashMode::Random(cut),
        ] {
            let fs = Arc::new(FaultStorage::new(initial.clone(), Some(cut)));
            let dev = diskimg_vmdk::DRIVER
                .open(fs.clone(), &OpenOptions::new())
                .unwrap();
            let mut flushed = Vec::new();
            let mut pending = Vec::new();
            assert!(
                workload(dev.as_ref(), &mut flushed, &mut pending).is_err(),
                "cut {cut} did not crash"
            );
            drop(dev);
            let img = fs.crash_image(mode);
            let ms: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
            let dev = diskimg_vmdk::DRIVER
                .open(ms, &OpenOptions::new().read_only(true))
                .unwrap_or_else(|e| panic!("cut {cut} {mode:?}: {e}"));
            let content = read_all(dev.as_ref());
            // Later (unflushed) writes may have landed over flushed data: skip those bytes.
            let mut expect: Vec<Option<u8>> = vec![None; SIZE as usize];
            for (off, data) in &flushed {
                for (i, b) in data.iter().enumerate() {
                    expect[*off as usize + i] = Some(*b);
                }
            }
            for (off, data) in &pending {
                expect[*off as usize..*off as usize + data.len()].fill(None);
            }
            let bad = expect
                .iter()
                .zip(&content)
                .position(|(e, c)| e.is_some_and(|e| e != *c));
            assert!(
                bad.is_none(),
                "cut {cut} {mode:?}: flushed byte lost at {bad:?}"
            );
            if cut % 3 == 0 || mode == CrashMode::Random(cut) {
                let path = dir.path().join("crash.vmdk");
                std::fs::write(&path, &img).unwrap();
                assert_qemu_check_clean(&path, "vmdk");
            }
        }
    }
}

fn stream_workload(dev: &dyn BlockDevice, flushed: &mut Vec<u64>) -> diskimg_blockio::Result<()> {
    let g = dev.compressed_write_granularity().unwrap();
    for (i, grain) in [0u64, 3, 4, 17, 31].iter().enumerate() {
        dev.write_compressed(&pattern(*grain, g as usize), grain * g)?;
        if i % 2 == 1 {
            dev.flush()?;
            flushed.extend([0u64, 3, 4, 17, 31].iter().take(i + 1));
        }
    }
    dev.flush()?;
    flushed.extend([0u64, 3, 4, 17, 31]);
    Ok(())
}

#[test]
fn stream_optimized_crash_at_every_operation() {
    let s = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(
        SIZE,
        OptionList::parse("subformat=streamOptimized").unwrap(),
    )
    .image_name("s.vmdk");
    diskimg_vmdk::DRIVER.create(s.clone(), &mut req).unwrap();
    let initial = s.to_vec();
    let counter = Arc::new(FaultStorage::new(initial.clone(), None));
    let dev = diskimg_vmdk::DRIVER
        .open(counter.clone(), &OpenOptions::new())
        .unwrap();
    stream_workload(dev.as_ref(), &mut Vec::new()).unwrap();
    let total = counter.ops();
    let dir = tempdir();
    for cut in 0..total {
        for mode in [
            CrashMode::KeepAll,
            CrashMode::DropUnflushed,
            CrashMode::Random(cut * 7),
        ] {
            let fs = Arc::new(FaultStorage::new(initial.clone(), Some(cut)));
            let dev = diskimg_vmdk::DRIVER
                .open(fs.clone(), &OpenOptions::new())
                .unwrap();
            let mut flushed = Vec::new();
            assert!(stream_workload(dev.as_ref(), &mut flushed).is_err());
            drop(dev);
            let img = fs.crash_image(mode);
            let ms: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
            let dev = diskimg_vmdk::DRIVER
                .open(ms, &OpenOptions::new().read_only(true))
                .unwrap();
            let content = read_all(dev.as_ref());
            for grain in flushed {
                let o = (grain * 65536) as usize;
                assert!(
                    content[o..o + 65536] == pattern(grain, 65536)[..],
                    "cut {cut} {mode:?} grain {grain}"
                );
            }
            let path = dir.path().join("crash.vmdk");
            std::fs::write(&path, &img).unwrap();
            assert_qemu_check_clean(&path, "vmdk");
        }
    }
}
