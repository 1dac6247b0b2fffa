//! Images qemu writes read identically here; images we write read identically in qemu.

use diskimg_blockio::{ExtentKind, ZeroFlags, map_all};
use diskimg_testutil::{
    pattern, qemu_compare, qemu_create, qemu_img_ok, qemu_io, qemu_map_json, qemu_read_raw,
    read_all, tempdir,
};

use crate::{create, open, qemu_size};

const QEMU_OPTS: [&str; 4] = [
    "subformat=dynamic",
    "subformat=dynamic,force_size=on",
    "subformat=fixed",
    "subformat=fixed,force_size=on",
];

#[test]
fn qemu_images_read_identically() {
    let dir = tempdir();
    for (i, o) in QEMU_OPTS.iter().enumerate() {
        let p = dir.path().join(format!("q{i}.vhd"));
        let ps = p.to_str().unwrap();
        qemu_img_ok(&["create", "-q", "-f", "vpc", "-o", o, ps, "20000000"]);
        qemu_io(
            &p,
            "vpc",
            &[
                "write -P 0x11 0 65536",
                "write -P 0x22 2000000 3000000",
                "write -P 0x33 9999872 512",
                "write -z 2100000 4096",
            ],
        );
        let dev = open(&p, true);
        assert_eq!(dev.virtual_size(), qemu_size(&p), "{o}");
        assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&p, "vpc"), "{o}");
    }
}

#[test]
fn our_images_match_qemu_sizes_and_layout() {
    let dir = tempdir();
    for size in [1u64 << 20, 20_000_000, 64 << 20, 1000, 0] {
        for o in QEMU_OPTS {
            let ours = dir.path().join("ours.vhd");
            let theirs = dir.path().join("theirs.vhd");
            create(&ours, size, o);
            qemu_create(&theirs, "vpc", o, Some(&size.to_string()));
            let a = std::fs::read(&ours).unwrap();
            let b = std::fs::read(&theirs).unwrap();
            assert_eq!(a.len(), b.len(), "{o} {size}");
            // Same bytes except the time stamp (24..28), checksum (64..68), uuid (68..84)
            // in each footer copy.
            let masked = |v: &mut Vec<u8>| {
                let n = v.len();
                let bases = if o.contains("fixed") {
                    vec![n - 512]
                } else {
                    vec![0, n - 512]
                };
                for base in bases {
                    v[base + 24..base + 28].fill(0);
                    v[base + 64..base + 84].fill(0);
                }
            };
            let (mut a, mut b) = (a, b);
            masked(&mut a);
            masked(&mut b);
            if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
                panic!("{o} {size}: layout differs from qemu's at byte {i}");
            }
            if size == 0 && o.contains("fixed") {
                // qemu 10.0.2 cannot open its own empty fixed VHD (the footer is then
                // at offset 0 and it looks for a dynamic header); we open it.
                assert_eq!(open(&ours, true).virtual_size(), 0);
                continue;
            }
            assert_eq!(qemu_size(&ours), qemu_size(&theirs), "{o} {size}");
            assert_eq!(open(&ours, true).virtual_size(), qemu_size(&theirs));
        }
    }
}

#[test]
fn our_writes_read_back_in_qemu_and_map_agrees() {
    let dir = tempdir();
    for o in QEMU_OPTS {
        let p = dir.path().join("w.vhd");
        create(&p, 12 << 20, o);
        let dev = open(&p, false);
        let size = dev.virtual_size();
        let mut model = vec![0u8; size as usize];
        for (i, (off, len)) in [
            (0u64, 4096usize),
            (3_000_001, 70_000),
            (2_097_000, 5000),
            (size - 513, 513),
        ]
        .into_iter()
        .enumerate()
        {
            let d = pattern(i as u64 + 1, len);
            dev.write_at(&d, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&d);
        }
        dev.write_zeroes(3_000_100, 1000, ZeroFlags::default())
            .unwrap();
        model[3_000_100..3_001_100].fill(0);
        dev.flush().unwrap();
        drop(dev);
        assert_eq!(qemu_read_raw(&p, "vpc"), model, "{o}");
        let raw = dir.path().join("m.raw");
        std::fs::write(&raw, &model).unwrap();
        assert!(qemu_compare(&p, "vpc", &raw, "raw"), "{o}");
        // map: extents, flags and host offsets agree with qemu (fixed disks: the host
        // file's holes are data that reads as zeroes).
        let dev = open(&p, true);
        let ours = map_all(dev.as_ref(), 0, size).unwrap();
        let theirs = qemu_map_json(&p, "vpc");
        let theirs = theirs.as_array().unwrap();
        assert_eq!(ours.len(), theirs.len(), "{o}: {ours:?} vs {theirs:?}");
        for (e, t) in ours.iter().zip(theirs) {
            assert_eq!(e.offset, t["start"].as_u64().unwrap());
            assert_eq!(e.len, t["length"].as_u64().unwrap());
            let flags = (t["data"].as_bool().unwrap(), t["zero"].as_bool().unwrap());
            let (want, host) = match e.kind {
                ExtentKind::Data { offset } => ((true, false), offset),
                ExtentKind::DataZero { offset } => ((true, true), Some(offset)),
                ExtentKind::Zero { offset } => ((false, true), offset),
                k => panic!("unexpected {k:?}"),
            };
            assert_eq!(flags, want, "{o}: {e:?} vs {t}");
            assert_eq!(host, t["offset"].as_u64(), "{o}: {e:?} vs {t}");
        }
    }
}

#[test]
fn azure_align_rounds_to_mib() {
    let dir = tempdir();
    let p = dir.path().join("az.vhd");
    create(&p, 10_000_000, "subformat=fixed,azure_align=on");
    assert_eq!(qemu_size(&p), 10 << 20);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), (10 << 20) + 512);
    let info = diskimg_testutil::qemu_info_json(&p, "vpc");
    assert_eq!(info["format"], "vpc");
}

#[test]
fn fixed_vhd_probes_as_vpc() {
    use diskimg_blockio::{Driver, FileStorage};
    let dir = tempdir();
    let p = dir.path().join("f.vhd");
    create(&p, 1 << 20, "subformat=fixed");
    let s = FileStorage::open(&p, true).unwrap();
    assert_eq!(diskimg_vhd::DRIVER.probe(&s), 60);
    let d = dir.path().join("d.vhd");
    create(&d, 1 << 20, "");
    assert_eq!(
        diskimg_vhd::DRIVER.probe(&FileStorage::open(&d, true).unwrap()),
        100
    );
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    assert_eq!(
        diskimg_vhd::DRIVER.probe(&FileStorage::open(&raw, true).unwrap()),
        0
    );
}

#[test]
fn chs_rounding_matches_qemu_across_sizes() {
    let dir = tempdir();
    let sizes: [u64; 13] = [
        1,
        511,
        513,
        (1 << 20) + 1,
        100 << 20,
        1 << 30,
        10 << 30,
        127 << 30,
        136_365_211_648,
        1 << 40,
        2040 << 30,
        (2040 << 30) + 512,
        2041 << 30,
    ];
    for size in sizes {
        for o in ["subformat=dynamic", "subformat=dynamic,force_size=on"] {
            let theirs = dir.path().join("t.vhd");
            let ours = dir.path().join("o.vhd");
            let q = diskimg_testutil::qemu_img(&[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                o,
                theirs.to_str().unwrap(),
                &size.to_string(),
            ]);
            let s: std::sync::Arc<dyn diskimg_blockio::Storage> =
                std::sync::Arc::new(diskimg_blockio::FileStorage::create(&ours).unwrap());
            let mut req = diskimg_blockio::CreateRequest::new(
                size,
                diskimg_blockio::OptionList::parse(o).unwrap(),
            );
            use diskimg_blockio::Driver;
            let r = diskimg_vhd::DRIVER.create(s, &mut req);
            assert_eq!(q.status.success(), r.is_ok(), "{o} {size}: {r:?}");
            if r.is_ok() {
                assert_eq!(
                    open(&ours, true).virtual_size(),
                    qemu_size(&theirs),
                    "{o} {size}"
                );
                assert_eq!(qemu_size(&ours), qemu_size(&theirs), "{o} {size}");
            }
        }
    }
}

#[test]
fn small_block_size_both_ways() {
    use diskimg_vhd::footer::{DiskType, Footer, rounded_size};
    // A dynamic VHD with 4 KiB blocks (qemu reads and writes any power-of-two size).
    let size = 1u64 << 20;
    let (geo, _) = rounded_size(size, true).unwrap();
    let f = Footer::build(DiskType::Dynamic, size, geo, *b"qem2", 0, [3; 16]);
    let entries = (size / 4096) as u32;
    let h = diskimg_vhd::header::build(entries, 4096, None);
    let mut img = Vec::new();
    img.extend_from_slice(&f.raw);
    img.extend_from_slice(&h);
    img.extend(std::iter::repeat_n(0xffu8, entries as usize * 4));
    img.extend_from_slice(&f.raw);
    let dir = tempdir();
    let a = dir.path().join("a.vhd");
    let b = dir.path().join("b.vhd");
    std::fs::write(&a, &img).unwrap();
    std::fs::write(&b, &img).unwrap();
    qemu_io(
        &a,
        "vpc",
        &[
            "write -P 0x61 1000 10000",
            "write -P 0x62 500000 3",
            "write -P 0x63 1040000 8576",
        ],
    );
    let dev = open(&a, true);
    assert_eq!(dev.info().cluster_size, Some(4096));
    assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&a, "vpc"));
    let dev = open(&b, false);
    dev.write_at(&[0x61; 10000], 1000).unwrap();
    dev.write_at(&[0x62; 3], 500_000).unwrap();
    dev.write_at(&[0x63; 8576], 1_040_000).unwrap();
    dev.flush().unwrap();
    assert_eq!(qemu_read_raw(&b, "vpc"), qemu_read_raw(&a, "vpc"));
    assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&a, "vpc"));
}

#[test]
fn fixed_preallocation_full() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir();
    let p = dir.path().join("pre.vhd");
    create(&p, 2 << 20, "subformat=fixed,preallocation=full");
    assert!(std::fs::metadata(&p).unwrap().blocks() * 512 >= 2 << 20);
    assert_eq!(qemu_size(&p), open(&p, true).virtual_size());
    assert!(qemu_read_raw(&p, "vpc").iter().all(|&b| b == 0));
    let s: std::sync::Arc<dyn diskimg_blockio::Storage> =
        std::sync::Arc::new(diskimg_blockio::FileStorage::create(&p).unwrap());
    let mut req = diskimg_blockio::CreateRequest::new(
        1 << 20,
        diskimg_blockio::OptionList::parse("preallocation=metadata").unwrap(),
    );
    use diskimg_blockio::Driver;
    assert!(diskimg_vhd::DRIVER.create(s, &mut req).is_err());
}
