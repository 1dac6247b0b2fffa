//! Crash consistency: cut a workload at every storage write/flush, reopen the crash
//! image in every mode (the sweep: `diskimg_testutil::crash`); it opens (here and in
//! qemu), has no corruption, data flushed before the cut reads back, and `check -r all`
//! trims leaked space.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, CreateRequest, Driver, FaultStorage, MemStorage, OpenOptions,
    OptionList, RepairMode, Storage,
};
use diskimg_testutil::crash::{Durable, count_ops, sweep};
use diskimg_testutil::{pattern, qemu_read_raw, read_all, tempdir};

const SIZE: u64 = 6 << 20;
const STEPS: [(usize, usize); 5] = [
    (1000, 5000),
    (2_097_100, 4096),
    (0, 512),
    (4_500_000, 70_000),
    (1_000_000, 1_200_000),
];

fn bytes_of(s: &MemStorage) -> Vec<u8> {
    let mut v = vec![0u8; s.len().unwrap() as usize];
    s.read_exact_at(&mut v, 0).unwrap();
    v
}

fn fresh(opts: &str) -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::parse(opts).unwrap());
    diskimg_vhd::DRIVER.create(s.clone(), &mut req).unwrap();
    bytes_of(&s)
}

/// The workload: writes into new and existing blocks, a flush after each step, recorded
/// in `guest`.
fn workload(dev: &dyn BlockDevice, guest: &mut Durable) -> diskimg_blockio::Result<()> {
    for (i, (off, len)) in STEPS.into_iter().enumerate() {
        let d = pattern(i as u64 + 3, len);
        guest.write(off as u64, &d);
        dev.write_at(&d, off as u64)?;
        dev.flush()?;
        guest.flushed();
    }
    Ok(())
}

fn open_mem(img: Vec<u8>, parent: &Option<Arc<dyn BlockDevice>>) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
    let dev = diskimg_vhd::DRIVER.open(s, &OpenOptions::new()).unwrap();
    if parent.is_some() {
        dev.set_backing(parent.clone()).unwrap();
    }
    dev
}

fn crash_sweep(init: Vec<u8>, parent: Option<Arc<dyn BlockDevice>>, base: Vec<u8>, qemu: bool) {
    let dir = tempdir();
    let run = |fs: Arc<FaultStorage>| {
        let dev = diskimg_vhd::DRIVER.open(fs, &OpenOptions::new()).unwrap();
        dev.set_backing(parent.clone()).unwrap();
        let mut guest = Durable::new(base.clone());
        let done = workload(dev.as_ref(), &mut guest).is_ok();
        (guest, done)
    };
    let total = count_ops(&init, |fs| assert!(run(fs).1));
    assert!(total > 10);
    let mut repaired = 0;
    sweep(
        &init,
        0..total,
        |cut| cut,
        run,
        |c| {
            let what = c.what();
            let dev = open_mem(c.img.clone(), &parent);
            let r = dev.check(RepairMode::None).unwrap();
            assert_eq!(r.corruptions, 0, "{what}: {r:?}");
            let got = read_all(dev.as_ref());
            c.ran.0.assert_holds(&got, &what);
            if r.leaks > 0 {
                let r = dev.check(RepairMode::All).unwrap();
                assert!(r.leaks_fixed > 0 && r.leaks == 0, "{r:?}");
                assert_eq!(read_all(dev.as_ref()), got);
                assert_eq!(dev.check(RepairMode::None).unwrap().leaks, 0);
                repaired += 1;
            }
            if qemu && c.cut % 5 == 0 && c.mode == CrashMode::Random(c.cut) {
                let p = dir.path().join("crash.vhd");
                std::fs::write(&p, &c.img).unwrap();
                assert_eq!(
                    qemu_read_raw(&p, "vpc"),
                    got,
                    "qemu reads the crash image differently"
                );
            }
        },
    );
    assert!(
        repaired > 0,
        "no crash left leaked space: the leak check is untested"
    );
}

#[test]
fn crash_dynamic() {
    crash_sweep(fresh(""), None, vec![0u8; fresh_size()], true);
}

fn fresh_size() -> usize {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fresh("")));
    diskimg_vhd::DRIVER
        .open(s, &OpenOptions::new())
        .unwrap()
        .virtual_size() as usize
}

#[test]
fn crash_differencing() {
    // A parent with data everywhere, then a child over it.
    let ps = Arc::new(MemStorage::from_vec(fresh("")));
    let parent = diskimg_vhd::DRIVER
        .open(ps.clone(), &OpenOptions::new())
        .unwrap();
    let size = parent.virtual_size() as usize;
    let base = pattern(99, size);
    parent.write_at(&base, 0).unwrap();
    parent.flush().unwrap();
    let child = MemStorage::new();
    diskimg_vhd::create_differencing(&child, ps.as_ref(), "parent.vhd").unwrap();
    crash_sweep(bytes_of(&child), Some(parent), base, false);
}

/// New blocks reach the on-disk BAT at the next flush: per new block one footer flush
/// (the file must always end with a footer), and one data flush plus one BAT write per
/// flush whatever their number (there was a second flush and a BAT write per block).
#[test]
fn bat_entries_are_committed_once_per_flush() {
    let fs = Arc::new(FaultStorage::new(fresh("subformat=dynamic"), None));
    let dev = diskimg_vhd::DRIVER
        .open(fs.clone(), &OpenOptions::new())
        .unwrap();
    let mib = 1usize << 20;
    let before = fs.ops();
    // Three new 2 MiB blocks.
    for k in 0..3 {
        dev.write_at(&[k as u8 + 1; 4096], (k * 2 * mib) as u64)
            .unwrap();
    }
    let per_block = (fs.ops() - before) / 3;
    // Unflushed: a crash keeps the old BAT (the blocks are unreferenced).
    let img = fs.crash_image(CrashMode::KeepAll);
    let old = open_mem(img, &None);
    assert!(read_all(old.as_ref()).iter().all(|&b| b == 0));
    let before_flush = fs.ops();
    dev.flush().unwrap();
    assert_eq!(fs.ops() - before_flush, 3, "data flush, BAT write, flush");
    let new = open_mem(fs.crash_image(CrashMode::DropUnflushed), &None);
    let bytes = read_all(new.as_ref());
    for k in 0..3 {
        let at = k * 2 * mib;
        assert!(
            bytes[at..at + 4096].iter().all(|&b| b == k as u8 + 1),
            "block {k}"
        );
    }
    // Footer, its flush, data, bitmap: no BAT write and no second flush per block.
    assert_eq!(per_block, 4, "storage operations per new block");
}
