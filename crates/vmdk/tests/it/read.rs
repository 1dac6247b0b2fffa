//! Images qemu writes read byte-identical; map agrees with qemu's.

use diskimg_blockio::{ExtentKind, map_all};
use diskimg_testutil::{
    corpus_file, qemu_img_ok, qemu_io, qemu_map_json, qemu_read_raw, read_all, tempdir,
};

use crate::common::{SUBFORMATS, open, p};

const WRITES: &[&str] = &[
    "write -P 0x11 0 4k",
    "write -P 0x22 65000 70000",
    "write -P 0x33 3M 1M",
    "write -z 3200k 64k",
    "write -P 0x44 8388096 512",
];

#[test]
fn qemu_subformats_read_identical() {
    for sub in SUBFORMATS {
        let dir = tempdir();
        let img = dir.path().join("q.vmdk");
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            &p(&img),
            "8M",
        ]);
        if *sub == "streamOptimized" {
            // qemu writes streamOptimized only whole grains, through convert.
            let raw = dir.path().join("src.raw");
            qemu_img_ok(&["create", "-q", "-f", "raw", &p(&raw), "8M"]);
            qemu_io(&raw, "raw", WRITES);
            qemu_img_ok(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                &p(&raw),
                &p(&img),
            ]);
        } else {
            qemu_io(&img, "vmdk", WRITES);
        }
        let dev = open(&img, true).unwrap();
        assert_eq!(dev.virtual_size(), 8 << 20);
        assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&img, "vmdk"), "{sub}");
        let info = dev.info();
        let (_, fs) = info.format_specific.unwrap();
        assert_eq!(fs[2].1, diskimg_blockio::InfoValue::Str(sub.to_string()));
        assert!(
            dev.check(diskimg_blockio::RepairMode::None)
                .unwrap()
                .corruptions
                == 0
        );
    }
}

#[test]
fn map_agrees_with_qemu() {
    for sub in ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat"] {
        let dir = tempdir();
        let img = dir.path().join("m.vmdk");
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            &p(&img),
            "8M",
        ]);
        qemu_io(&img, "vmdk", WRITES);
        let dev = open(&img, true).unwrap();
        let ours = map_all(dev.as_ref(), 0, 8 << 20).unwrap();
        let theirs = qemu_map_json(&img, "vmdk");
        // Compare per 64 KiB grain: data flag and offset.
        for g in 0..128u64 {
            let pos = g * 65536;
            let e = ours
                .iter()
                .find(|e| e.offset <= pos && pos < e.offset + e.len)
                .unwrap();
            let q = theirs
                .as_array()
                .unwrap()
                .iter()
                .find(|q| {
                    let s = q["start"].as_u64().unwrap();
                    s <= pos && pos < s + q["length"].as_u64().unwrap()
                })
                .unwrap();
            let qdata = q["data"].as_bool().unwrap();
            let our_data = matches!(e.kind, ExtentKind::Data { .. });
            assert_eq!(our_data, qdata, "{sub} grain {g}: {e:?} vs {q}");
            if let (ExtentKind::Data { offset: Some(o) }, Some(qo)) = (e.kind, q["offset"].as_u64())
            {
                let qo = qo + (pos - q["start"].as_u64().unwrap());
                assert_eq!(o + (pos - e.offset), qo, "{sub} grain {g}");
            }
        }
    }
}

#[test]
fn version3_stream_sample_reads_like_qemu() {
    let dir = tempdir();
    let img = corpus_file("iotest-version3.vmdk", dir.path());
    let dev = open(&img, true).unwrap();
    assert_eq!(dev.virtual_size(), 16 << 30);
    assert!(
        open(&img, false).is_ok(),
        "stream-optimized v3 may be opened rw like qemu"
    );
    // qemu converts to a sparse raw file; compare every grain qemu maps as data and
    // samples of the rest.
    let raw = dir.path().join("v3.raw");
    qemu_img_ok(&["convert", "-f", "vmdk", "-O", "raw", &p(&img), &p(&raw)]);
    let rs = diskimg_blockio::FileStorage::open(&raw, true).unwrap();
    use diskimg_blockio::Storage;
    let map = qemu_map_json(&img, "vmdk");
    let mut checked = 0;
    for q in map.as_array().unwrap() {
        let s = q["start"].as_u64().unwrap();
        let l = q["length"].as_u64().unwrap().min(1 << 20);
        let mut a = vec![0u8; l as usize];
        let mut b = vec![0u8; l as usize];
        dev.read_at(&mut a, s).unwrap();
        rs.read_exact_at(&mut b, s).unwrap();
        assert_eq!(a, b, "at {s}");
        let e = dev.map(s, l).unwrap();
        assert_eq!(
            e.kind == ExtentKind::Compressed,
            q["data"].as_bool().unwrap(),
            "at {s}"
        );
        checked += 1;
    }
    assert!(checked > 100);
}

#[test]
fn delta_disk_reads_through_parent() {
    let dir = tempdir();
    let base = dir.path().join("base.vmdk");
    let child = dir.path().join("child.vmdk");
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&base), "4M"]);
    qemu_io(&base, "vmdk", &["write -P 0xaa 0 1M"]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "backing_file=base.vmdk,backing_fmt=vmdk",
        &p(&child),
    ]);
    qemu_io(&child, "vmdk", &["write -P 0xbb 512k 100k"]);
    let dev = open(&child, true).unwrap();
    let b = dev.info().backing.unwrap();
    assert_eq!(b.filename, "base.vmdk");
    assert_eq!(b.format.as_deref(), Some("vmdk"));
    dev.set_backing(Some(open(&base, true).unwrap())).unwrap();
    assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&child, "vmdk"));
    // A parent with another CID is refused (qemu iotest 225).
    let other = dir.path().join("other.vmdk");
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&other), "4M"]);
    let dev = open(&child, true).unwrap();
    assert!(dev.set_backing(Some(open(&other, true).unwrap())).is_err());
}

#[test]
fn afl9_fails_cleanly() {
    let dir = tempdir();
    let img = corpus_file("afl9.vmdk", dir.path());
    let err = open(&img, true).unwrap_err().to_string();
    assert!(err.contains("L1 size too big"), "{err}");
    let out = diskimg_testutil::qemu_img(&["info", &p(&img)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("L1 size too big"));
}
