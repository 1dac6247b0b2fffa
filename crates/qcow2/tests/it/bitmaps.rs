//! Guest writes to images with persistent dirty bitmaps, against qemu-io on a copy of
//! the same image: same bits, same flags, clean `qemu-img check`, crash consistency.

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, FaultStorage, FileStorage, MemStorage, OpenOptions, Preallocation,
    RepairMode, Storage, ZeroFlags,
};
use diskimg_qcow2::{BitmapInfo, Qcow2Device, read_bitmap};
use diskimg_testutil::{
    assert_qemu_check_clean, qemu_check_json, qemu_compare, qemu_img, qemu_img_ok, qemu_info_json,
    qemu_io, read_all, tempdir,
};

const MB: u64 = 1 << 20;

/// A bitmap's granularity and data.
type Bits = (u64, Vec<u8>);

/// (offset, length, kind): 0 write, 1 write-zeroes, 2 write-zeroes may-unmap, 3 discard,
/// 4 compressed write.
const OPS: &[(u64, u64, u8)] = &[
    (0, 1000, 0),
    (100 << 10, 8 << 10, 0),
    (3 * MB + 5, 70000, 0),
    (5 * MB, 64 << 10, 1),
    (6 * MB + 512, 4096, 2),
    (7 * MB, 128 << 10, 3),
    (8 * MB - 1, 1, 0),
    (24 << 16, 1 << 16, 4),
];

fn qemu_cmd(&(o, l, k): &(u64, u64, u8)) -> String {
    match k {
        0 => format!("write -P 0x5a {o} {l}"),
        1 => format!("write -z {o} {l}"),
        2 => format!("write -z -u {o} {l}"),
        4 => format!("write -c -P 0x5a {o} {l}"),
        _ => format!("discard {o} {l}"),
    }
}

fn apply(dev: &dyn BlockDevice, &(o, l, k): &(u64, u64, u8)) -> diskimg_blockio::Result<()> {
    match k {
        0 => dev.write_at(&vec![0x5a; l as usize], o),
        1 | 2 => dev.write_zeroes(o, l, ZeroFlags { may_unmap: k == 2 }),
        4 => dev.write_compressed(&vec![0x5a; l as usize], o),
        _ => dev.discard(o, l),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn open_rw(p: &Path) -> Qcow2Device {
    let f: Arc<dyn Storage> = Arc::new(FileStorage::open(p, false).unwrap());
    Qcow2Device::open(f, &OpenOptions::new()).unwrap()
}

fn bits(p: &Path, name: &str) -> (u64, Vec<u8>) {
    read_bitmap(Arc::new(FileStorage::open(p, true).unwrap()), name).unwrap()
}

/// `(name, flags)` of every bitmap as `qemu-img info` shows them.
fn qemu_flags(p: &Path) -> Vec<(String, Vec<String>)> {
    let out = qemu_img_ok(&["info", "-U", "--output=json", s(p)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            let f = b["flags"].as_array().unwrap();
            let f = f.iter().map(|x| x.as_str().unwrap().to_string()).collect();
            (b["name"].as_str().unwrap().to_string(), f)
        })
        .collect()
}

fn flags(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    list.iter()
        .map(|(n, f)| (n.to_string(), f.iter().map(|x| x.to_string()).collect()))
        .collect()
}

/// A 8 MiB image with enabled bitmaps of three granularities (one with bits set
/// beforehand) and a disabled one with bits set.
fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("orig.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "8M"]);
    qemu_img_ok(&["bitmap", "--add", s(&p), "old"]);
    qemu_img_ok(&["bitmap", "--add", "--disable", s(&p), "dis"]);
    qemu_io(&p, "qcow2", &["write -P 1 2M 4k", "write -P 2 4M 1M"]);
    qemu_img_ok(&["bitmap", "--merge", "old", s(&p), "dis"]);
    qemu_img_ok(&["bitmap", "--add", s(&p), "en"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "4096", s(&p), "en4k"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "512", s(&p), "en512"]);
    p
}

const NAMES: [&str; 5] = ["old", "dis", "en", "en4k", "en512"];

#[test]
fn writes_set_the_same_bits_as_qemu() {
    let dir = tempdir();
    let orig = image(dir.path());
    let (ours, theirs) = (dir.path().join("ours.qcow2"), dir.path().join("q.qcow2"));
    std::fs::copy(&orig, &ours).unwrap();
    std::fs::copy(&orig, &theirs).unwrap();
    let cmds: Vec<String> = OPS.iter().map(qemu_cmd).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&theirs, "qcow2", &cmds);

    let dev = open_rw(&ours);
    // Marked in use on disk before the first write, the disabled bitmap too (qemu
    // loads every bitmap of a read-write open and stores each again at close).
    let in_use = |n: &str| BitmapInfo {
        name: n.into(),
        granularity: if n == "en4k" {
            4096
        } else if n == "en512" {
            512
        } else {
            65536
        },
        in_use: true,
        auto: n != "dis",
    };
    assert_eq!(
        dev.bitmaps(),
        NAMES.iter().map(|n| in_use(n)).collect::<Vec<_>>()
    );
    let au: &[&str] = &["in-use", "auto"];
    assert_eq!(
        qemu_flags(&ours),
        flags(&[
            ("old", au),
            ("dis", &["in-use"]),
            ("en", au),
            ("en4k", au),
            ("en512", au)
        ])
    );
    for op in OPS {
        apply(&dev, op).unwrap();
    }
    dev.close().unwrap();
    drop(dev);

    assert_qemu_check_clean(&ours, "qcow2");
    assert!(qemu_compare(&ours, "qcow2", &theirs, "qcow2"));
    let a: &[&str] = &["auto"];
    let want = flags(&[
        ("old", a),
        ("dis", &[]),
        ("en", a),
        ("en4k", a),
        ("en512", a),
    ]);
    assert_eq!(qemu_flags(&theirs), want);
    assert_eq!(qemu_flags(&ours), want);
    for n in NAMES {
        let (ob, qb) = (bits(&ours, n), bits(&theirs, n));
        assert_eq!(ob, qb, "bitmap {n}");
        if n != "dis" {
            assert_ne!(ob, bits(&orig, n), "bitmap {n} unchanged");
        }
    }
    assert_eq!(bits(&ours, "dis"), bits(&orig, "dis"));
    // The pre-existing bits of "old" survive next to the new ones.
    let (g, old) = bits(&ours, "old");
    assert_eq!(g, 65536);
    let want_old = [3, 0, 0, 1, 1, 0, 3, 0, 0xff, 0xff, 1, 0, 1, 0, 3, 0x80];
    assert_eq!(old, want_old);
    // A second session adds to the stored bits, as a second qemu-io run does.
    qemu_io(&theirs, "qcow2", &["write 1M 1"]);
    let dev = open_rw(&ours);
    dev.write_at(&[1], MB).unwrap();
    drop(dev);
    assert_qemu_check_clean(&ours, "qcow2");
    for n in NAMES {
        assert_eq!(bits(&ours, n), bits(&theirs, n), "bitmap {n}");
    }
}

#[test]
fn random_requests_set_the_same_bits_as_qemu() {
    let dir = tempdir();
    let orig = image(dir.path());
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for round in 0..3 {
        let ops: Vec<(u64, u64, u8)> = (0..24)
            .map(|_| {
                let k = next(4) as u8;
                let (o, l) = if k == 0 {
                    (next(8 * MB), 1 + next(200_000))
                } else {
                    (next(8 * MB / 512) * 512, 512 * (1 + next(400)))
                };
                (o, l.min(8 * MB - o), k)
            })
            .collect();
        let (ours, theirs) = (dir.path().join("ours.qcow2"), dir.path().join("q.qcow2"));
        std::fs::copy(&orig, &ours).unwrap();
        std::fs::copy(&orig, &theirs).unwrap();
        let cmds: Vec<String> = ops.iter().map(qemu_cmd).collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&theirs, "qcow2", &cmds);
        let dev = open_rw(&ours);
        for op in &ops {
            apply(&dev, op).unwrap();
        }
        drop(dev);
        assert_qemu_check_clean(&ours, "qcow2");
        assert!(qemu_compare(&ours, "qcow2", &theirs, "qcow2"));
        for n in NAMES {
            assert_eq!(bits(&ours, n), bits(&theirs, n), "round {round} bitmap {n}");
        }
    }
}

#[test]
fn read_only_open_changes_nothing() {
    let dir = tempdir();
    let p = image(dir.path());
    let before = std::fs::read(&p).unwrap();
    let f: Arc<dyn Storage> = Arc::new(FileStorage::open(&p, true).unwrap());
    let dev = Qcow2Device::open(f, &OpenOptions::new().read_only(true)).unwrap();
    assert!(dev.bitmaps().iter().all(|b| !b.in_use));
    read_all(&dev);
    drop(dev);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

/// Sets the `in_use` flag of `name` by closing nothing: a copy of the file taken while
/// our device has it open (what a crash leaves).
fn in_use_copy(orig: &Path, out: &Path) {
    let tmp = out.with_extension("tmp");
    std::fs::copy(orig, &tmp).unwrap();
    let dev = open_rw(&tmp);
    std::fs::copy(&tmp, out).unwrap();
    drop(dev);
}

#[test]
fn bitmap_in_use_on_open_is_left_alone_as_qemu_does() {
    let dir = tempdir();
    let orig = image(dir.path());
    let crashed = dir.path().join("crashed.qcow2");
    in_use_copy(&orig, &crashed);
    let (ours, theirs) = (dir.path().join("ours.qcow2"), dir.path().join("q.qcow2"));
    std::fs::copy(&crashed, &ours).unwrap();
    std::fs::copy(&crashed, &theirs).unwrap();
    let au: &[&str] = &["in-use", "auto"];
    let want = flags(&[
        ("old", au),
        ("dis", &["in-use"]),
        ("en", au),
        ("en4k", au),
        ("en512", au),
    ]);
    assert_eq!(qemu_flags(&crashed), want);
    // Writes are allowed; the inconsistent bitmaps stay in use and unchanged.
    qemu_io(&theirs, "qcow2", &["write 0 64k"]);
    let dev = open_rw(&ours);
    assert!(dev.bitmaps().iter().any(|b| b.in_use));
    // Our check does not report in-use bitmaps either.
    let r = dev.check(RepairMode::None).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    dev.write_at(&[7; 65536], 0).unwrap();
    // qemu refuses to resize with an inconsistent bitmap, and so do we.
    let e = dev.resize(16 * MB, Preallocation::Off, false).unwrap_err();
    let q = qemu_img(&["resize", s(&crashed), "16M"]);
    assert!(!q.status.success());
    let qerr = String::from_utf8_lossy(&q.stderr);
    assert!(qerr.contains("Bitmap 'old' is inconsistent and cannot be used"));
    assert!(
        e.to_string().contains("Bitmap 'old' is inconsistent"),
        "{e}"
    );
    drop(dev);
    assert_qemu_check_clean(&ours, "qcow2");
    assert_eq!(qemu_flags(&theirs), want);
    assert_eq!(qemu_flags(&ours), want);
    for n in NAMES {
        assert_eq!(bits(&ours, n), bits(&theirs, n), "bitmap {n}");
        assert_eq!(bits(&ours, n), bits(&orig, n), "bitmap {n}");
    }
}

#[test]
fn resize_keeps_bitmaps_as_qemu_does() {
    let dir = tempdir();
    let orig = image(dir.path());
    for (size, shrink) in [("12M", false), ("3M", true), ("8388608", false)] {
        let (ours, theirs) = (dir.path().join("ours.qcow2"), dir.path().join("q.qcow2"));
        std::fs::copy(&orig, &ours).unwrap();
        std::fs::copy(&orig, &theirs).unwrap();
        let mut args = vec!["resize", "-q"];
        if shrink {
            args.push("--shrink");
        }
        args.extend([s(&theirs), size]);
        qemu_io(&theirs, "qcow2", &["write 1M 64k"]);
        qemu_img_ok(&args);
        qemu_io(&theirs, "qcow2", &["write 2M 1"]);
        let new = qemu_info_json(&theirs, "qcow2")["virtual-size"]
            .as_u64()
            .unwrap();
        let dev = open_rw(&ours);
        dev.write_at(&[9; 65536], MB).unwrap();
        drop(dev);
        let dev = open_rw(&ours);
        dev.resize(new, Preallocation::Off, shrink).unwrap();
        dev.write_at(&[9], 2 * MB).unwrap();
        drop(dev);
        assert_qemu_check_clean(&ours, "qcow2");
        assert_eq!(qemu_flags(&ours), qemu_flags(&theirs), "{size}");
        for n in NAMES {
            assert_eq!(bits(&ours, n), bits(&theirs, n), "{size} bitmap {n}");
        }
    }
}

#[test]
fn extension_dropped_when_the_autoclear_bit_is_clear_as_qemu() {
    let dir = tempdir();
    let orig = image(dir.path());
    let mut img = std::fs::read(&orig).unwrap();
    img[95] &= !1;
    let (ours, theirs) = (dir.path().join("ours.qcow2"), dir.path().join("q.qcow2"));
    std::fs::write(&ours, &img).unwrap();
    std::fs::write(&theirs, &img).unwrap();
    qemu_io(&theirs, "qcow2", &["write 0 4k"]);
    let dev = open_rw(&ours);
    assert!(dev.bitmaps().is_empty());
    dev.write_at(&[1; 4096], 0).unwrap();
    drop(dev);
    assert_eq!(qemu_flags(&theirs), qemu_flags(&ours));
    assert!(qemu_flags(&ours).is_empty());
    // Same header cluster (the extension is gone from both), same leaks.
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert_eq!(a[..4096], b[..4096]);
    let (qa, qb) = (
        qemu_check_json(&ours, "qcow2").0,
        qemu_check_json(&theirs, "qcow2").0,
    );
    assert_eq!(qa["leaks"], qb["leaks"]);
    assert!(qa["leaks"].as_u64().unwrap() > 0);
}

#[test]
fn snapshot_apply_refused_with_bitmaps_as_qemu() {
    let dir = tempdir();
    let p = dir.path().join("s.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "1M"]);
    qemu_img_ok(&["bitmap", "--add", "--disable", s(&p), "dis"]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&p)]);
    let q = qemu_img(&["snapshot", "-a", "s1", s(&p)]);
    assert!(
        String::from_utf8_lossy(&q.stderr).contains("Device has active dirty bitmaps"),
        "{q:?}"
    );
    let dev = open_rw(&p);
    let e = dev.apply_snapshot("s1").unwrap_err();
    assert_eq!(e.to_string(), "Device has active dirty bitmaps");
    // Creating and deleting snapshots is allowed, as in qemu.
    dev.create_snapshot("s2").unwrap();
    dev.delete_snapshot("s1").unwrap();
    drop(dev);
    assert_qemu_check_clean(&p, "qcow2");
}

fn mem_open(img: Vec<u8>, ro: bool) -> diskimg_blockio::Result<Qcow2Device> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
    Qcow2Device::open(s, &OpenOptions::new().read_only(ro))
}

#[test]
fn crash_at_every_write_leaves_a_consistent_image() {
    let dir = tempdir();
    let orig = image(dir.path());
    let img = std::fs::read(&orig).unwrap();
    let run = |fs: Arc<FaultStorage>| -> diskimg_blockio::Result<()> {
        let dev = Qcow2Device::open(fs, &OpenOptions::new())?;
        for op in OPS {
            apply(&dev, op)?;
        }
        dev.flush()?;
        dev.write_at(&[3; 4096], 6 * MB)?;
        dev.resize(12 * MB, Preallocation::Off, false)?;
        dev.write_at(&[4; 512], 11 * MB)?;
        dev.close()
    };
    let (count, done) = {
        let fs = Arc::new(FaultStorage::new(img.clone(), None));
        run(fs.clone()).unwrap();
        (fs.ops(), fs.crash_image(CrashMode::KeepAll))
    };
    assert!(count > 20, "{count}");
    let state = |img: &[u8]| -> Vec<(BitmapInfo, Option<Bits>)> {
        let dev = mem_open(img.to_vec(), true).unwrap();
        let list = dev.bitmaps();
        drop(dev);
        list.into_iter()
            .map(|b| {
                let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.to_vec()));
                let bits = (!b.in_use).then(|| read_bitmap(s, &b.name).unwrap());
                (b, bits)
            })
            .collect()
    };
    let (before, after) = (state(&img), state(&done));
    assert_ne!(before, after);
    let path = dir.path().join("crash.qcow2");
    let mut saw_in_use = false;
    for cut in 0..count {
        let fs = Arc::new(FaultStorage::new(img.clone(), Some(cut)));
        let _ = run(fs.clone());
        for mode in [
            CrashMode::KeepAll,
            CrashMode::DropUnflushed,
            CrashMode::Random(cut),
        ] {
            let crashed = fs.crash_image(mode);
            let dev = mem_open(crashed.clone(), true).unwrap();
            let r = dev.check(RepairMode::None).unwrap();
            assert_eq!(
                (r.corruptions, r.check_errors),
                (0, 0),
                "cut {cut} {mode:?}: {r:?}"
            );
            drop(dev);
            // Every bitmap is in use, or holds the bits of before or after the session.
            for (k, (b, bits)) in state(&crashed).into_iter().enumerate() {
                saw_in_use |= b.in_use;
                if !b.in_use {
                    let ok = [&before[k], &after[k]]
                        .iter()
                        .any(|(x, y)| x.name == b.name && y.as_ref() == bits.as_ref());
                    assert!(ok, "cut {cut} {mode:?}: bitmap {} has other bits", b.name);
                }
            }
            if cut % 4 == 0 && mode != CrashMode::DropUnflushed {
                std::fs::write(&path, &crashed).unwrap();
                let (v, _) = qemu_check_json(&path, "qcow2");
                assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "cut {cut}: {v}");
                assert_eq!(v["check-errors"].as_u64().unwrap_or(0), 0, "cut {cut}: {v}");
                assert_eq!(v["leaks"].as_u64().unwrap_or(0), r.leaks, "cut {cut}: {v}");
            }
            // It opens read-write again (a new session).
            let dev = mem_open(crashed, false).unwrap();
            dev.write_at(&[1], 0).unwrap();
            dev.close().unwrap();
        }
    }
    assert!(saw_in_use);
}

/// `write_from` (copy offloading, `convert -C`) marks the same bits as `write_at`.
#[test]
fn write_from_marks_bits_like_write_at() {
    let dir = tempdir();
    let orig = image(dir.path());
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    std::fs::copy(&orig, &a).unwrap();
    std::fs::copy(&orig, &b).unwrap();
    let src = MemStorage::from_vec(vec![0x5a; 2 * MB as usize]);
    // Cluster-aligned (offloaded) and unaligned (buffered) ranges.
    let ranges = [
        (0, 1000),
        (MB, 192 << 10),
        (3 * MB + 5, 70000),
        (6 * MB, MB),
    ];
    {
        let (da, db) = (open_rw(&a), open_rw(&b));
        for &(o, l) in &ranges {
            da.write_at(&vec![0x5a; l as usize], o).unwrap();
            db.write_from(o, l, &src, 4096).unwrap();
        }
    }
    for n in NAMES {
        assert_eq!(bits(&a, n), bits(&b, n), "bitmap {n}");
    }
    let en = bits(&b, "en").1;
    assert!(en.iter().any(|&x| x != 0));
    assert_qemu_check_clean(&b, "qcow2");
    assert!(qemu_compare(&a, "qcow2", &b, "qcow2"));
}

/// `BlockDevice::close` stores the bitmaps and reports a failure to do so (dropping
/// could not); after it the device refuses writes, and a second close does nothing.
#[test]
fn close_reports_errors_and_ends_writes() {
    let dir = tempdir();
    let img = std::fs::read(image(dir.path())).unwrap();
    // Count the operations of a session that writes once, then cut during its close.
    let count = Arc::new(FaultStorage::new(img.clone(), None));
    let dev: Box<dyn BlockDevice> =
        Box::new(Qcow2Device::open(count.clone(), &OpenOptions::new()).unwrap());
    dev.write_at(&[1; 4096], 0).unwrap();
    let before_close = count.ops();
    dev.close().unwrap();
    assert!(count.ops() > before_close, "close stored nothing");
    assert!(dev.write_at(&[1; 512], 0).is_err(), "write after close");
    let mut buf = [0u8; 4096];
    dev.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [1; 4096]);
    let after = count.ops();
    dev.close().unwrap();
    assert_eq!(count.ops(), after, "second close wrote");

    let cut = Arc::new(FaultStorage::new(img, Some(before_close)));
    let dev: Box<dyn BlockDevice> =
        Box::new(Qcow2Device::open(cut.clone(), &OpenOptions::new()).unwrap());
    dev.write_at(&[1; 4096], 0).unwrap();
    assert!(dev.close().is_err(), "a failed store must be reported");
}
