//! Crash consistency: cut the workload at every storage operation, reopen the crash
//! image in every mode (the sweep: `diskimg_testutil::crash`), qemu-img check it and find
//! the flushed data.

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, CreateRequest, Driver, FaultStorage, MemStorage, OpenOptions,
    OptionList,
};
use diskimg_testutil::crash::{Crash, Durable, count_ops, open_image, sweep};
use diskimg_testutil::{assert_qemu_check_clean, pattern, read_all, tempdir};

const SIZE: u64 = 2 << 20;

fn fresh_image() -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::parse("zeroed_grain=on").unwrap())
        .image_name("c.vmdk");
    diskimg_vmdk::DRIVER.create(s.clone(), &mut req).unwrap();
    s.to_vec()
}

/// Runs the workload, recording it in `guest` (each write before it is made, each
/// completed flush).
fn workload(dev: &dyn BlockDevice, guest: &mut Durable) -> diskimg_blockio::Result<()> {
    let steps: &[(u64, usize)] = &[
        (0, 4096),
        (70_000, 1000),
        (1 << 20, 65536),
        (200_000, 100),
        (1_500_000, 200_000),
    ];
    for (i, (off, len)) in steps.iter().enumerate() {
        let data = pattern(i as u64 + 1, *len);
        guest.write(*off, &data);
        dev.write_at(&data, *off)?;
        if i % 2 == 1 {
            dev.flush()?;
            guest.flushed();
        }
    }
    guest.zero(1 << 20, 65536);
    dev.write_zeroes(1 << 20, 65536, Default::default())?;
    dev.flush()?;
    guest.flushed();
    Ok(())
}

/// Runs `work` on `fs` (opened read-write); returns the guest it recorded and whether
/// the workload failed (the storage was cut).
fn run(
    fs: Arc<FaultStorage>,
    work: impl Fn(&dyn BlockDevice, &mut Durable) -> diskimg_blockio::Result<()>,
) -> (Durable, bool) {
    let dev = diskimg_vmdk::DRIVER.open(fs, &OpenOptions::new()).unwrap();
    let mut guest = Durable::new(vec![0; SIZE as usize]);
    let failed = work(dev.as_ref(), &mut guest).is_err();
    (guest, failed)
}

/// Judges one crash image: the workload was cut, the image opens read-only, every byte
/// flushed before the cut reads back unless a later (unflushed) write may have changed
/// it, and with `qemu` (a scratch directory) `qemu-img check` finds it clean.
fn judge(c: &Crash<'_, (Durable, bool)>, qemu: Option<&Path>) {
    let what = c.what();
    let (guest, failed) = c.ran;
    assert!(*failed, "{what}: did not crash");
    let ro = OpenOptions::new().read_only(true);
    let dev = open_image(&diskimg_vmdk::DRIVER, &c.img, &ro, &what);
    guest.assert_holds(&read_all(dev.as_ref()), &what);
    if let Some(dir) = qemu {
        let path = dir.join("crash.vmdk");
        std::fs::write(&path, &c.img).unwrap();
        assert_qemu_check_clean(&path, "vmdk");
    }
}

#[test]
fn crash_at_every_operation() {
    let initial = fresh_image();
    let total = count_ops(&initial, |fs| assert!(!run(fs, workload).1));
    assert!(total > 10, "{total}");
    let dir = tempdir();
    let cut_run = |fs| run(fs, workload);
    sweep(
        &initial,
        0..total,
        |cut| cut,
        cut_run,
        |c| {
            // qemu-img check is slow to spawn: every third cut and every random image.
            let qemu = c.cut % 3 == 0 || c.mode == CrashMode::Random(c.cut);
            judge(&c, qemu.then(|| dir.path()));
        },
    );
}

fn stream_workload(dev: &dyn BlockDevice, guest: &mut Durable) -> diskimg_blockio::Result<()> {
    let g = dev.compressed_write_granularity().unwrap();
    for (i, grain) in [0u64, 3, 4, 17, 31].iter().enumerate() {
        let data = pattern(*grain, g as usize);
        guest.write(grain * g, &data);
        dev.write_compressed(&data, grain * g)?;
        if i % 2 == 1 {
            dev.flush()?;
            guest.flushed();
        }
    }
    dev.flush()?;
    guest.flushed();
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
    let total = count_ops(&initial, |fs| assert!(!run(fs, stream_workload).1));
    let dir = tempdir();
    let cut_run = |fs| run(fs, stream_workload);
    sweep(
        &initial,
        0..total,
        |cut| cut * 7,
        cut_run,
        |c| {
            judge(&c, Some(dir.path()));
        },
    );
}
