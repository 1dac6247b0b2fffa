//! Images qemu writes read byte-identical; map agrees with qemu's.

use diskimg_blockio::{ExtentKind, map_all};
use diskimg_testutil::{
    corpus_file, qemu_create, qemu_img_ok, qemu_io, qemu_map_json, qemu_read_raw, read_all, tempdir,
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
        qemu_create(&img, "vmdk", &format!("subformat={sub}"), Some("8M"));
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
        qemu_create(&img, "vmdk", &format!("subformat={sub}"), Some("8M"));
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
            // A hole in a flat extent file is data that reads as zeroes in both:
            // `"zero": true, "data": true` (docs/formats/vmdk.md, map).
            let our_data = match e.kind {
                ExtentKind::Data { .. } => true,
                ExtentKind::DataZero { .. } => {
                    assert_eq!(q["zero"].as_bool(), Some(true), "{sub} grain {g}: {q}");
                    true
                }
                _ => false,
            };
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
    qemu_create(
        &child,
        "vmdk",
        "backing_file=base.vmdk,backing_fmt=vmdk",
        None,
    );
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

#[test]
fn large_sparse_sizes_iotest_059() {
    let dir = tempdir();
    // Big twoGbMaxExtentFlat made by qemu: 500 extent files, written near the end.
    let big = dir.path().join("big.vmdk");
    qemu_create(&big, "vmdk", "subformat=twoGbMaxExtentFlat", Some("1000G"));
    qemu_io(&big, "vmdk", &["write -P 0x5a 999G 64k"]);
    let dev = open(&big, false).unwrap();
    assert_eq!(dev.virtual_size(), 1000 << 30);
    let mut buf = vec![0u8; 65536];
    dev.read_at(&mut buf, 999 << 30).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    dev.write_at(&[0x66; 4096], (2 << 30) - 2048).unwrap(); // crosses two extent files
    dev.flush().unwrap();
    drop(dev);
    qemu_io(&big, "vmdk", &["read -P 0x66 2147481600 4096"]);
    let e = open(&big, true)
        .unwrap()
        .map((2 << 30) - 2048, 4096)
        .unwrap();
    assert_eq!(e.len, 2048, "map stops at the extent boundary");
    // 4 TB monolithicFlat made by us, written by qemu at 3 TB.
    let flat = dir.path().join("flat.vmdk");
    crate::common::create(&flat, 4 << 40, "subformat=monolithicFlat").unwrap();
    assert_eq!(
        diskimg_testutil::qemu_info_json(&flat, "vmdk")["virtual-size"].as_u64(),
        Some(4 << 40)
    );
    qemu_io(&flat, "vmdk", &["write -P 0x77 3T 4k"]);
    let dev = open(&flat, true).unwrap();
    let mut b = [0u8; 4096];
    dev.read_at(&mut b, 3 << 40).unwrap();
    assert!(b.iter().all(|&x| x == 0x77));
    assert_eq!(
        dev.map(3 << 40, 4096).unwrap().kind,
        ExtentKind::Data {
            offset: Some(3 << 40)
        }
    );
}

fn to_json(v: &diskimg_blockio::InfoValue) -> serde_json::Value {
    use diskimg_blockio::InfoValue as I;
    match v {
        I::Bool(b) => (*b).into(),
        I::Int(i) => (*i).into(),
        I::Str(s) => s.clone().into(),
        I::List(l) => l.iter().map(to_json).collect(),
        I::Map(m) => {
            serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
    }
}

#[test]
fn format_specific_info_matches_qemu() {
    for sub in SUBFORMATS {
        let dir = tempdir();
        let img = dir.path().join("i.vmdk");
        qemu_create(&img, "vmdk", &format!("subformat={sub}"), Some("3G"));
        let q = diskimg_testutil::qemu_info_json(&img, "vmdk");
        let mut qd = q["format-specific"]["data"].clone();
        let info = open(&img, true).unwrap().info();
        let (ty, data) = info.format_specific.unwrap();
        assert_eq!(ty, q["format-specific"]["type"]);
        let mut ours = to_json(&diskimg_blockio::InfoValue::Map(data));
        // Extent file names: qemu prints them as opened (with the directory).
        for v in [&mut qd, &mut ours] {
            for e in v["extents"].as_array_mut().unwrap() {
                let f = e["filename"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string();
                e["filename"] = f.into();
            }
        }
        assert_eq!(
            serde_json::to_string(&ours).unwrap(),
            serde_json::to_string(&qd).unwrap(),
            "{sub}"
        );
        assert_eq!(info.cluster_size, q["cluster-size"].as_u64(), "{sub}");
        assert_eq!(info.virtual_size, q["virtual-size"].as_u64().unwrap());
    }
}
