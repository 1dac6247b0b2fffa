//! Crash consistency of the maintenance operations (refcount rebuild, make_empty,
//! set_backing_file, amend downgrade/upgrade): cut the storage at every write and flush;
//! every crash image must open, keep the guest content, and show no corruption (or, for
//! the repair, still be repairable to a clean image).

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, Driver, FaultStorage, MemStorage, OpenOptions, OptionList, RepairMode,
    Storage,
};
use diskimg_qcow2::{DRIVER, Qcow2Device};
use diskimg_testutil::{assert_qemu_check_clean, qemu_img_ok, qemu_io, read_all, tempdir};

fn qdev(d: &Arc<dyn BlockDevice>) -> &Qcow2Device {
    d.as_any().downcast_ref::<Qcow2Device>().unwrap()
}

fn open_mem(img: &[u8], ro: bool) -> diskimg_blockio::Result<Arc<dyn BlockDevice>> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.to_vec()));
    let mut o = OpenOptions::new().read_only(ro);
    o.driver_options.set("check", "on");
    DRIVER.open(s, &o)
}

/// Runs `op` on `initial` cut at every storage operation; calls `verify` on every crash
/// image of every mode.
fn every_cut(
    initial: &[u8],
    check_mode: bool,
    op: &dyn Fn(&Arc<dyn BlockDevice>) -> diskimg_blockio::Result<()>,
    verify: &dyn Fn(&[u8], u64, CrashMode),
) {
    let open = |fs: Arc<FaultStorage>| {
        let mut o = OpenOptions::new();
        if check_mode {
            o.driver_options.set("check", "on");
        }
        DRIVER.open(fs, &o)
    };
    let count = {
        let fs = Arc::new(FaultStorage::new(initial.to_vec(), None));
        let dev = open(fs.clone()).unwrap();
        op(&dev).unwrap();
        dev.flush().unwrap();
        fs.ops()
    };
    assert!(count > 3, "{count}");
    for cut in 0..count {
        let fs = Arc::new(FaultStorage::new(initial.to_vec(), Some(cut)));
        if let Ok(dev) = open(fs.clone()) {
            let _ = op(&dev).and_then(|()| dev.flush());
        }
        for mode in [
            CrashMode::KeepAll,
            CrashMode::DropUnflushed,
            CrashMode::Random(cut),
        ] {
            verify(&fs.crash_image(mode), cut, mode);
        }
    }
}

fn qemu_image(dir: &std::path::Path, create: &str, cmds: &[&str]) -> Vec<u8> {
    let p = dir.join("src.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        create,
        p.to_str().unwrap(),
        "2M",
    ]);
    qemu_io(&p, "qcow2", cmds);
    std::fs::read(&p).unwrap()
}

#[test]
fn refcount_rebuild_survives_crashes() {
    let dir = tempdir();
    let mut img = qemu_image(
        dir.path(),
        "cluster_size=4k",
        &["write -P 1 0 300k", "write -P 2 1M 64k"],
    );
    let expected = read_all(open_mem(&img, true).unwrap().as_ref());
    let rt = u64::from_be_bytes(img[48..56].try_into().unwrap()) as usize;
    img[rt..rt + 8].fill(0); // no refcount block: check -r all must rebuild
    let path = dir.path().join("cut.qcow2");
    every_cut(
        &img,
        true,
        &|d| d.check(RepairMode::All).map(|_| ()),
        &|crashed, cut, mode| {
            let dev = open_mem(crashed, true).unwrap();
            assert_eq!(read_all(dev.as_ref()), expected, "cut {cut} {mode:?}");
            // Whatever state the crash left, a new repair makes it clean.
            let dev = open_mem(crashed, false).unwrap();
            dev.check(RepairMode::All).unwrap();
            let r = dev.check(RepairMode::None).unwrap();
            assert_eq!(
                (r.corruptions, r.leaks),
                (0, 0),
                "cut {cut} {mode:?}: {r:?}"
            );
            if cut % 8 == 0 && mode == CrashMode::KeepAll {
                // qemu agrees that our repair of the crash image is clean.
                drop(dev);
                std::fs::write(&path, crashed).unwrap();
                let mut o = OpenOptions::new();
                o.driver_options.set("check", "on");
                let file = diskimg_blockio::FileStorage::open(&path, false).unwrap();
                let dev = Qcow2Device::open(Arc::new(file), &o).unwrap();
                dev.check(RepairMode::All).unwrap();
                drop(dev);
                assert_qemu_check_clean(&path, "qcow2");
            }
        },
    );
}

#[test]
fn make_empty_and_set_backing_survive_crashes() {
    let dir = tempdir();
    let img = qemu_image(
        dir.path(),
        "cluster_size=4k",
        &["write -P 1 0 100k", "write -z 200k 8k", "write -P 3 1M 20k"],
    );
    let check_clean = |crashed: &[u8], cut: u64, mode: CrashMode| {
        let dev = open_mem(crashed, true).unwrap();
        let r = dev.check(RepairMode::None).unwrap();
        assert_eq!(
            (r.corruptions, r.check_errors),
            (0, 0),
            "cut {cut} {mode:?}: {r:?}"
        );
        dev
    };
    every_cut(
        &img,
        false,
        &|d| qdev(d).make_empty(),
        &|crashed, cut, mode| {
            // Emptying from scratch (as qemu) breaks the refcounts on the way, under
            // the dirty bit: a crash image with broken refcounts is marked dirty, and
            // the repair of the next read-write open makes it clean.
            let r = open_mem(crashed, true)
                .unwrap()
                .check(RepairMode::None)
                .unwrap();
            let dirty = crashed.get(79).is_some_and(|b| b & 1 != 0);
            assert!(r.corruptions == 0 || dirty, "cut {cut} {mode:?}: {r:?}");
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(crashed.to_vec()));
            let dev = DRIVER.open(s, &OpenOptions::new()).unwrap();
            let r = dev.check(RepairMode::None).unwrap();
            assert_eq!(
                (r.corruptions, r.check_errors),
                (0, 0),
                "cut {cut} {mode:?}: {r:?}"
            );
        },
    );
    let before = read_all(open_mem(&img, true).unwrap().as_ref());
    every_cut(
        &img,
        false,
        &|d| qdev(d).set_backing_file(Some("some/backing.raw"), Some("raw")),
        &|crashed, cut, mode| {
            let dev = check_clean(crashed, cut, mode);
            let b = dev.info().backing.map(|b| (b.filename, b.format));
            assert!(
                b.is_none() || b == Some(("some/backing.raw".into(), Some("raw".into()))),
                "cut {cut} {mode:?}: {b:?}"
            );
            dev.set_backing(None).unwrap();
            assert_eq!(read_all(dev.as_ref()), before, "cut {cut} {mode:?}");
        },
    );
}

#[test]
fn amend_compat_changes_survive_crashes() {
    let dir = tempdir();
    let img = qemu_image(
        dir.path(),
        "cluster_size=4k,compat=1.1",
        &[
            "write -P 1 0 100k",
            "write -z 40k 8k",
            "write -z -u 300k 16k",
            "write -P 3 1M 20k",
        ],
    );
    let content = read_all(open_mem(&img, true).unwrap().as_ref());
    for target in ["compat=0.10", "lazy_refcounts=on,size=3M"] {
        let opts = OptionList::parse(target).unwrap();
        every_cut(
            &img,
            false,
            &|d| qdev(d).amend(&opts),
            &|crashed, cut, mode| {
                let dev = open_mem(crashed, true).unwrap();
                let r = dev.check(RepairMode::None).unwrap();
                assert_eq!(
                    (r.corruptions, r.check_errors),
                    (0, 0),
                    "{target} cut {cut} {mode:?}: {r:?}"
                );
                let now = read_all(dev.as_ref());
                assert_eq!(
                    now[..content.len()],
                    content[..],
                    "{target} cut {cut} {mode:?}"
                );
            },
        );
    }
}

#[test]
fn bitmap_edits_survive_crashes() {
    use diskimg_qcow2::{BitmapOp, edit_bitmaps};
    let dir = tempdir();
    qemu_image(dir.path(), "cluster_size=4k", &["write -P 1 0 100k"]);
    let p = dir.path().join("src.qcow2");
    qemu_img_ok(&["bitmap", "--add", p.to_str().unwrap(), "old"]);
    qemu_io(&p, "qcow2", &["write -P 2 0 1M"]);
    let img = std::fs::read(&p).unwrap();
    let content = read_all(open_mem(&img, true).unwrap().as_ref());
    let run = |fs: Arc<FaultStorage>| -> diskimg_blockio::Result<()> {
        edit_bitmaps(
            fs.clone(),
            "new",
            &[BitmapOp::Add {
                granularity: None,
                enabled: true,
            }],
        )?;
        edit_bitmaps(fs.clone(), "new", &[BitmapOp::Merge("old".into())])?;
        edit_bitmaps(fs.clone(), "old", &[BitmapOp::Clear])?;
        edit_bitmaps(fs, "old", &[BitmapOp::Remove])
    };
    let count = {
        let fs = Arc::new(FaultStorage::new(img.clone(), None));
        run(fs.clone()).unwrap();
        fs.ops()
    };
    assert!(count > 5, "{count}");
    for cut in 0..count {
        let fs = Arc::new(FaultStorage::new(img.clone(), Some(cut)));
        let _ = run(fs.clone());
        for mode in [
            CrashMode::KeepAll,
            CrashMode::DropUnflushed,
            CrashMode::Random(cut),
        ] {
            let crashed = fs.crash_image(mode);
            let dev = open_mem(&crashed, true).unwrap();
            let r = dev.check(RepairMode::None).unwrap();
            assert_eq!(
                (r.corruptions, r.check_errors),
                (0, 0),
                "cut {cut} {mode:?}: {r:?}"
            );
            assert_eq!(read_all(dev.as_ref()), content, "cut {cut} {mode:?}");
        }
    }
}

/// Every maintenance operation on damaged copies of an image with snapshots, bitmaps,
/// zero and compressed clusters: errors are fine, panics and hangs are not.
#[test]
fn maintenance_on_damaged_images_never_panics() {
    use diskimg_qcow2::{BitmapOp, edit_bitmaps};
    let dir = tempdir();
    qemu_image(
        dir.path(),
        "cluster_size=4k",
        &[
            "write -P 1 0 64k",
            "write -z 64k 8k",
            "write -c -P 2 128k 4k",
        ],
    );
    let p = dir.path().join("src.qcow2");
    qemu_img_ok(&["snapshot", "-c", "s", p.to_str().unwrap()]);
    qemu_img_ok(&["bitmap", "--add", p.to_str().unwrap(), "b"]);
    let img = std::fs::read(&p).unwrap();
    let mut variants: Vec<Vec<u8>> = Vec::new();
    for i in 0..img.len().min(512) {
        for flip in [0x01u8, 0xff] {
            let mut v = img.clone();
            v[i] ^= flip;
            variants.push(v);
        }
    }
    for i in (512..img.len()).step_by(61) {
        let mut v = img.clone();
        v[i] ^= 0xff;
        variants.push(v);
    }
    let rw = |v: &[u8]| open_mem(v, false);
    for v in &variants {
        if let Ok(d) = rw(v) {
            let _ = d.check(RepairMode::All);
            let _ = d.check(RepairMode::None);
        }
        if let Ok(d) = rw(v) {
            let q = qdev(&d);
            let _ = q.amend(&OptionList::parse("compat=0.10").unwrap());
            let _ = q.amend(&OptionList::parse("compat=1.1,lazy_refcounts=on").unwrap());
        }
        if let Ok(d) = rw(v) {
            let _ = qdev(&d).make_empty();
            let _ = qdev(&d).set_backing_file(Some("b.raw"), Some("raw"));
        }
        let s = Arc::new(MemStorage::from_vec(v.clone()));
        let _ = edit_bitmaps(s.clone(), "b", &[BitmapOp::Merge("b".into())]);
        let _ = edit_bitmaps(s.clone(), "b", &[BitmapOp::Clear, BitmapOp::Disable]);
        let _ = edit_bitmaps(
            s.clone(),
            "n",
            &[BitmapOp::Add {
                granularity: Some(512),
                enabled: true,
            }],
        );
        let _ = edit_bitmaps(s, "b", &[BitmapOp::Remove]);
    }
}

#[test]
fn header_rewrite_of_a_104_byte_v3_header() {
    // Images from qemu before 5.1 have 104-byte v3 headers (no compression type byte):
    // rewriting the header must keep the extensions that start right after it.
    let dir = tempdir();
    let mut img = qemu_image(dir.path(), "cluster_size=4k", &["write -P 1 0 64k"]);
    assert_eq!(u32::from_be_bytes(img[100..104].try_into().unwrap()), 112);
    img.copy_within(112..4096, 104);
    img[100..104].copy_from_slice(&104u32.to_be_bytes());
    // An unknown extension right after the 104-byte header.
    img[104..112].copy_from_slice(&[0x12, 0x34, 0x56, 0x78, 0, 0, 0, 4]);
    img[112..120].copy_from_slice(b"abcd\0\0\0\0");
    img[120..128].fill(0);
    let p = dir.path().join("h104.qcow2");
    std::fs::write(&p, &img).unwrap();
    let before = diskimg_testutil::qemu_info_json(&p, "qcow2");
    assert_eq!(before["format-specific"]["data"]["compat"], "1.1");
    let s: Arc<dyn Storage> = Arc::new(diskimg_blockio::FileStorage::open(&p, false).unwrap());
    let dev = Qcow2Device::open(s, &OpenOptions::new()).unwrap();
    dev.set_backing_file(Some("base.raw"), Some("raw")).unwrap();
    dev.set_backing_file(None, None).unwrap();
    drop(dev);
    assert_qemu_check_clean(&p, "qcow2");
    let after = diskimg_testutil::qemu_info_json(&p, "qcow2");
    assert_eq!(after["format-specific"], before["format-specific"]);
    // The unknown extension still starts right after the header.
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes[104..116], *b"\x12\x34\x56\x78\0\0\0\x04abcd");
    let raw = diskimg_testutil::qemu_read_raw(&p, "qcow2");
    assert_eq!(raw[..65536], [1u8; 65536]);
    // A v2 image upgraded has clean padding after its fields.
    let v2 = qemu_image(
        dir.path(),
        "compat=0.10,cluster_size=4k",
        &["write -P 1 0 64k"],
    );
    let p2 = dir.path().join("v2.qcow2");
    std::fs::write(&p2, &v2).unwrap();
    let s: Arc<dyn Storage> = Arc::new(diskimg_blockio::FileStorage::open(&p2, false).unwrap());
    let dev = Qcow2Device::open(s, &OpenOptions::new()).unwrap();
    dev.amend(&OptionList::parse("compat=1.1").unwrap())
        .unwrap();
    drop(dev);
    let up = std::fs::read(&p2).unwrap();
    assert_eq!(up[104..112], [0u8; 8]);
    assert_qemu_check_clean(&p2, "qcow2");
}
