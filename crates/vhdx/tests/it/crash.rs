//! Crash consistency: cut the storage at every write and flush of a workload, rebuild
//! what a disk could hold (every `CrashMode`; the sweep: `diskimg_testutil::crash`),
//! reopen (replaying the log), and check that the image is consistent (qemu-img check)
//! and that flushed data is intact.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, CreateRequest, Driver, FaultStorage, MemStorage, OpenOptions,
    OptionList, RepairMode, Storage, ZeroFlags,
};
use diskimg_testutil::crash::{count_ops, sweep};
use diskimg_testutil::{assert_qemu_check_clean, pattern, tempdir};

/// (offset, len, flush after) — disjoint ranges so each can be verified on its own.
const WRITES: &[(u64, usize, bool)] = &[
    (0, 4096, false),
    ((1 << 20) + 100, 3000, true),
    (3 << 20, 70_000, false),
    ((2 << 20) - 10, 20, true),
    ((5 << 20) + 512, 512, false),
    ((5 << 20) + 4096, 4096, true),
    (7 << 20, 65536, true),
];

fn base_image(opts: &str) -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(8 << 20, OptionList::parse(opts).unwrap());
    diskimg_vhdx::DRIVER.create(s.clone(), &mut req).unwrap();
    s.to_vec()
}

/// Runs the workload; returns how many writes were flushed before it stopped.
fn workload(dev: &dyn BlockDevice) -> usize {
    let mut flushed = 0;
    for (i, &(off, len, flush)) in WRITES.iter().enumerate() {
        if dev.write_at(&pattern(i as u64, len), off).is_err() {
            return flushed;
        }
        if i == 4
            && dev
                .write_zeroes(6 << 20, 1 << 20, ZeroFlags::default())
                .is_err()
        {
            return flushed;
        }
        if i == 2
            && dev
                .resize(12 << 20, diskimg_blockio::Preallocation::Off, false)
                .is_err()
        {
            return flushed;
        }
        if flush {
            if dev.flush().is_err() {
                return flushed;
            }
            flushed = i + 1;
        }
    }
    flushed
}

fn verify(img: &[u8], flushed: usize, parent: Option<Arc<dyn BlockDevice>>, what: &str) -> Vec<u8> {
    let s = Arc::new(MemStorage::from_vec(img.to_vec()));
    let dev = diskimg_vhdx::DRIVER
        .open(s.clone(), &crate::common::unlinked())
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    dev.set_backing(parent).unwrap();
    let r = dev.check(RepairMode::None).unwrap();
    assert_eq!(r.corruptions, 0, "{what}: {r:?}");
    for (i, &(off, len, _)) in WRITES.iter().enumerate().take(flushed) {
        let mut buf = vec![0u8; len];
        dev.read_at(&mut buf, off).unwrap();
        assert!(
            buf == pattern(i as u64, len),
            "{what}: flushed write {i} lost"
        );
    }
    if flushed > 2 {
        assert_eq!(dev.virtual_size(), 12 << 20, "{what}: flushed resize lost");
    } else {
        assert!([8 << 20, 12 << 20].contains(&dev.virtual_size()), "{what}");
    }
    if flushed > 4 {
        let mut buf = vec![1u8; 1 << 20];
        dev.read_at(&mut buf, 6 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "{what}: flushed zeroes lost");
    }
    drop(dev);
    s.to_vec()
}

fn crash_sweep(opts: &str, parent: Option<Arc<dyn BlockDevice>>, qemu: bool) {
    let initial = base_image(opts);
    let total = count_ops(&initial, |fs| {
        let dev = diskimg_vhdx::DRIVER
            .open(fs, &crate::common::unlinked())
            .unwrap();
        dev.set_backing(parent.clone()).unwrap();
        assert_eq!(workload(dev.as_ref()), WRITES.len());
    });
    eprintln!("{opts}: {total} ops");
    assert!(total > 20, "workload too small: {total} ops");
    let dir = tempdir();
    let file = dir.path().join("crash.vhdx");
    let mut replays = 0;
    let run =
        |fs: Arc<FaultStorage>| match diskimg_vhdx::DRIVER.open(fs, &crate::common::unlinked()) {
            Ok(dev) => {
                dev.set_backing(parent.clone()).unwrap();
                workload(dev.as_ref())
            }
            Err(_) => 0,
        };
    sweep(
        &initial,
        0..=total,
        |cut| cut,
        run,
        |c| {
            let what = format!("{opts} cut {}/{total} {:?}", c.cut, c.mode);
            let after = verify(&c.img, *c.ran, parent.clone(), &what);
            if log_in_use(&c.img) {
                replays += 1;
            }
            let m = match c.mode {
                CrashMode::KeepAll => 0,
                CrashMode::DropUnflushed => 1,
                CrashMode::Random(_) => 2,
            };
            if qemu && c.cut % 3 == m {
                std::fs::write(&file, &after).unwrap();
                assert_qemu_check_clean(&file, "vhdx");
            }
        },
    );
    assert!(replays > 0, "no crash image needed a log replay");
}

/// True when the current header (highest sequence number) names a log GUID, so the
/// reopen must replay the log.
fn log_in_use(img: &[u8]) -> bool {
    let h = |at: usize| {
        let seq = u64::from_le_bytes(img[at + 8..at + 16].try_into().unwrap());
        let used = img[at + 48..at + 64].iter().any(|&b| b != 0);
        (&img[at..at + 4] == b"head", seq, used)
    };
    let (a, b) = (h(64 << 10), h(128 << 10));
    match (a.0, b.0) {
        (true, true) if a.1 > b.1 => a.2,
        (true, true) => b.2,
        (true, false) => a.2,
        _ => b.2,
    }
}

#[test]
fn crash_at_every_step_dynamic() {
    crash_sweep("block_size=1M", None, true);
}

/// Fixed images: only the resize (new blocks allocated, then BAT and size through the
/// log) changes metadata.
#[test]
fn crash_at_every_step_fixed() {
    crash_sweep("subformat=fixed,block_size=1M", None, true);
}

#[test]
fn crash_at_every_step_differencing() {
    let parent_s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(base_image("block_size=1M")));
    let parent = diskimg_vhdx::DRIVER
        .open(parent_s, &OpenOptions::new())
        .unwrap();
    parent.write_at(&vec![0x5a; 8 << 20], 0).unwrap();
    crash_sweep("block_size=1M,backing_file=p.vhdx", Some(parent), false);
}

/// Crash images whose log we must replay are replayed identically by qemu
/// (`qemu-img check -r all`): our log entries are valid for another implementation.
#[test]
fn qemu_replays_our_logs_identically() {
    let initial = base_image("block_size=1M");
    let counter = Arc::new(FaultStorage::new(initial.clone(), None));
    {
        let dev = diskimg_vhdx::DRIVER
            .open(counter.clone(), &crate::common::unlinked())
            .unwrap();
        workload(dev.as_ref());
    }
    let dir = tempdir();
    let mut checked = 0;
    let mut replayed = 0;
    for cut in 0..counter.ops() {
        let fs = Arc::new(FaultStorage::new(initial.clone(), Some(cut)));
        if let Ok(dev) = diskimg_vhdx::DRIVER.open(fs.clone(), &OpenOptions::new()) {
            workload(dev.as_ref());
        }
        let img = fs.crash_image(CrashMode::KeepAll);
        if !log_in_use(&img) || replayed >= 4 {
            continue;
        }
        // Only images whose log holds an entry not yet applied in place are interesting.
        let theirs = dir.path().join("theirs.vhdx");
        std::fs::write(&theirs, &img).unwrap();
        let out = diskimg_testutil::qemu_img(&[
            "check",
            "-r",
            "all",
            "--output=json",
            theirs.to_str().unwrap(),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v["corruptions-fixed"] == 1 {
            replayed += 1;
        }
        let ours = verify(&img, 0, None, &format!("cut {cut}"));
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(ours));
        let dev = diskimg_vhdx::DRIVER
            .open(s, &OpenOptions::new().read_only(true))
            .unwrap();
        let expect = diskimg_testutil::qemu_read_raw(&theirs, "vhdx");
        assert!(
            diskimg_testutil::read_all(dev.as_ref()) == expect,
            "cut {cut}"
        );
        checked += 1;
    }
    assert!(checked > 0 && replayed > 0, "{checked} {replayed}");
}

/// Hundreds of log entries without a flush wrap around the 1 MiB log; crashing inside
/// the last update (log entry durable, in-place write lost) must replay that entry from
/// its wrapped position.
#[test]
fn log_wraps_around() {
    let parent_s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(base_image("block_size=1M")));
    let parent = diskimg_vhdx::DRIVER
        .open(parent_s, &OpenOptions::new())
        .unwrap();
    parent.write_at(&vec![0x5a; 1 << 20], 0).unwrap();
    let initial = base_image("block_size=1M,backing_file=p.vhdx");
    let mut model = vec![0x5au8; 8 << 20];
    model[1 << 20..].fill(0);
    // Each write sets one more sector bit: one 8 KiB log entry per write.
    let run = |fs: &Arc<FaultStorage>, n: u64| {
        let dev = diskimg_vhdx::DRIVER
            .open(fs.clone(), &crate::common::unlinked())
            .unwrap();
        dev.set_backing(Some(parent.clone())).unwrap();
        for i in 0..n {
            if dev
                .write_at(&[(i % 250) as u8 + 1; 7], i * 1024 + 100)
                .is_err()
            {
                break;
            }
        }
        // Crash without the final flush: the log stays live.
        std::mem::forget(dev);
    };
    let mut models = Vec::new();
    for i in 0..300u64 {
        let off = (i * 1024 + 100) as usize;
        model[off..off + 7].fill((i % 250) as u8 + 1);
        if i >= 298 {
            models.push(model.clone());
        }
    }
    let counter = Arc::new(FaultStorage::new(initial.clone(), None));
    run(&counter, 299);
    let before = counter.ops();
    let mut replayed_new = 0;
    for cut in before..before + 8 {
        let fs = Arc::new(FaultStorage::new(initial.clone(), Some(cut)));
        run(&fs, 300);
        let img = fs.crash_image(CrashMode::DropUnflushed);
        assert!(log_in_use(&img));
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
        let dev = diskimg_vhdx::DRIVER
            .open(s, &crate::common::unlinked())
            .unwrap();
        dev.set_backing(Some(parent.clone())).unwrap();
        let got = diskimg_testutil::read_all(dev.as_ref());
        assert!(got == models[0] || got == models[1], "cut {cut}");
        if got == models[1] {
            replayed_new += 1;
        }
    }
    assert!(replayed_new > 0);
}
