//! Images we create and write: qemu-img check clean, compare identical, and workloads
//! matching a qemu-io replica.

use diskimg_blockio::{RepairMode, ZeroFlags};
use diskimg_testutil::{
    assert_qemu_check_clean, pattern, qemu_compare, qemu_create, qemu_img_ok, qemu_info_json,
    qemu_io, qemu_read_raw, read_all, tempdir,
};

use crate::common::{create, open};

#[test]
fn created_images_pass_qemu_check_and_read_back() {
    let dir = tempdir();
    for (i, (opts, size)) in [
        ("", 24u64 << 20),
        ("subformat=fixed", 24 << 20),
        ("subformat=dynamic,block_size=1M,log_size=2M", 24 << 20),
        ("block_state_zero=off,block_size=2M", 24 << 20),
        ("subformat=fixed,block_size=1M", 5 << 20),
        ("", 100_000),
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("c{i}.vhdx"));
        create(&img, *size, opts);
        assert_qemu_check_clean(&img, "vhdx");
        let info = qemu_info_json(&img, "vhdx");
        let dev = open(&img, false);
        assert_eq!(info["virtual-size"], dev.virtual_size());
        assert_eq!(info["cluster-size"], dev.info().cluster_size.unwrap());
        let n = dev.virtual_size() as usize;
        let mut expect = vec![0u8; n];
        let data = pattern(i as u64, 70_000);
        for off in [0usize, 1 << 20, n - 70_000, n / 2 + 13] {
            let off = off.min(n - data.len());
            dev.write_at(&data, off as u64).unwrap();
            expect[off..off + data.len()].copy_from_slice(&data);
        }
        dev.flush().unwrap();
        drop(dev);
        assert_qemu_check_clean(&img, "vhdx");
        assert!(qemu_read_raw(&img, "vhdx") == expect, "content of {opts}");
        let dev = open(&img, true);
        assert!(read_all(dev.as_ref()) == expect);
    }
}

#[test]
fn default_block_size_and_options_match_qemu() {
    let dir = tempdir();
    for (size, opts) in [
        (64u64 << 20, ""),
        (2 << 30, ""),
        (200 << 30, ""),
        (1 << 30, "block_size=3M"),
        (1 << 30, "block_size=1000K"),
        (1 << 30, "block_size=512M"),
        (1 << 30, "log_size=1500K"),
        (1 << 30, "log_size=0"),
        (65 << 40, ""),
        (1 << 30, "subformat=foo"),
    ] {
        let ours = dir.path().join("o.vhdx");
        let theirs = dir.path().join("t.vhdx");
        let q = diskimg_testutil::qemu_img(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            if opts.is_empty() {
                "subformat=dynamic"
            } else {
                opts
            },
            theirs.to_str().unwrap(),
            &size.to_string(),
        ]);
        let s: std::sync::Arc<dyn diskimg_blockio::Storage> =
            std::sync::Arc::new(diskimg_blockio::FileStorage::create(&ours).unwrap());
        let mut req = diskimg_blockio::CreateRequest::new(
            size,
            diskimg_blockio::OptionList::parse(opts).unwrap(),
        );
        let r = diskimg_blockio::Driver::create(&diskimg_vhdx::DRIVER, s, &mut req);
        assert_eq!(r.is_ok(), q.status.success(), "{opts}: {r:?}");
        if let Err(e) = r {
            let msg = String::from_utf8_lossy(&q.stderr);
            let ours = e.to_string();
            assert!(msg.contains(&ours), "{msg} vs {ours}");
        } else {
            let a = qemu_info_json(&ours, "vhdx");
            let b = qemu_info_json(&theirs, "vhdx");
            assert_eq!(a["cluster-size"], b["cluster-size"], "{size} {opts}");
            assert_eq!(a["virtual-size"], b["virtual-size"]);
        }
    }
}

/// One workload op: (kind, offset, len). kind 0 = write, 1 = write_zeroes, 2 = discard.
const OPS: &[(u8, u64, u64)] = &[
    (0, 0, 65536),
    (0, 4095, 9000),
    (0, (3 << 20) - 100, 300),
    (1, 512, 1024),
    (0, 5 << 20, 2 << 20),
    (1, 5 << 20, 1 << 20),
    (2, 6 << 20, 1 << 20),
    (0, 6 << 20, 4096),
    (1, 8 << 20, 3 << 20),
    (0, (12 << 20) + 7, 1),
    (2, 0, 8 << 20),
    (0, (16 << 20) - 512, 512),
];

#[test]
fn workload_matches_qemu_io_replica() {
    let dir = tempdir();
    for opts in [
        "block_size=1M",
        "subformat=fixed,block_size=1M",
        "block_state_zero=off,block_size=2M",
    ] {
        let a = dir.path().join("a.vhdx");
        let b = dir.path().join("b.vhdx");
        create(&a, 16 << 20, opts);
        std::fs::copy(&a, &b).unwrap();
        let dev = open(&a, false);
        let mut cmds = Vec::new();
        for (i, &(kind, off, len)) in OPS.iter().enumerate() {
            let data = vec![(i as u8).wrapping_mul(37) | 1; len as usize];
            match kind {
                0 => {
                    dev.write_at(&data, off).unwrap();
                    cmds.push(format!("write -P {} {off} {len}", data[0]));
                }
                1 => {
                    dev.write_zeroes(off, len, ZeroFlags::default()).unwrap();
                    cmds.push(format!("write -z {off} {len}"));
                }
                _ => {
                    dev.discard(off, len).unwrap();
                    cmds.push(format!("discard {off} {len}"));
                }
            }
        }
        dev.flush().unwrap();
        let r = dev.check(RepairMode::None).unwrap();
        assert_eq!(r.corruptions, 0, "{r:?}");
        drop(dev);
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&b, "vhdx", &refs);
        assert_qemu_check_clean(&a, "vhdx");
        assert!(qemu_compare(&a, "vhdx", &b, "vhdx"), "{opts}");
    }
}

#[test]
fn qemu_written_image_then_our_writes() {
    let dir = tempdir();
    let img = dir.path().join("q.vhdx");
    qemu_img_ok(&["create", "-f", "vhdx", img.to_str().unwrap(), "32M"]);
    qemu_io(&img, "vhdx", &["write -P 0x11 0 9M"]);
    let dev = open(&img, false);
    dev.write_at(&[0x22; 1000], (8 << 20) + 100).unwrap();
    dev.write_at(&[0x33; 1000], 20 << 20).unwrap();
    drop(dev);
    assert_qemu_check_clean(&img, "vhdx");
    qemu_io(
        &img,
        "vhdx",
        &[
            "read -P 0x11 0 8M",
            "read -P 0x22 8388708 1000",
            "read -P 0x33 20M 1000",
            "read -P 0 21M 1M",
        ],
    );
}

#[test]
fn map_reports_real_extents() {
    let dir = tempdir();
    let img = dir.path().join("m.vhdx");
    create(&img, 8 << 20, "block_size=1M");
    let dev = open(&img, false);
    dev.write_at(&[1; 4096], 3 << 20).unwrap();
    let ext = diskimg_blockio::map_all(dev.as_ref(), 0, 8 << 20).unwrap();
    let data: Vec<_> = ext
        .iter()
        .filter(|e| matches!(e.kind, diskimg_blockio::ExtentKind::Data { .. }))
        .collect();
    assert_eq!(data.len(), 1);
    assert_eq!((data[0].offset, data[0].len), (3 << 20, 1 << 20));
    let diskimg_blockio::ExtentKind::Data { offset: Some(host) } = data[0].kind else {
        panic!()
    };
    drop(dev);
    // The host offset really holds the data.
    let bytes = std::fs::read(&img).unwrap();
    assert!(
        bytes[host as usize..host as usize + 4096]
            .iter()
            .all(|&b| b == 1)
    );
    // qemu reports the whole disk as data without offsets (documented difference).
    let m = diskimg_testutil::qemu_map_json(&img, "vhdx");
    assert_eq!(m[0]["data"], true);
    assert!(m[0].get("offset").is_none());
}

#[test]
fn concurrent_writers_and_readers() {
    let dir = tempdir();
    let img = dir.path().join("t.vhdx");
    create(&img, 16 << 20, "block_size=1M");
    let dev = open(&img, false);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let dev = dev.clone();
            s.spawn(move || {
                for i in 0..8u64 {
                    let off = (t * 4 + i % 4) * (1 << 20) + i * 4096;
                    dev.write_at(&pattern(t * 100 + i, 5000), off).unwrap();
                    let mut b = vec![0u8; 5000];
                    dev.read_at(&mut b, off).unwrap();
                    assert!(b == pattern(t * 100 + i, 5000));
                }
            });
        }
    });
    dev.flush().unwrap();
    drop(dev);
    assert_qemu_check_clean(&img, "vhdx");
    let dev = open(&img, true);
    for t in 0..4u64 {
        for i in 0..8u64 {
            let off = (t * 4 + i % 4) * (1 << 20) + i * 4096;
            let mut b = vec![0u8; 5000];
            dev.read_at(&mut b, off).unwrap();
            assert!(b == pattern(t * 100 + i, 5000));
        }
    }
}

#[test]
fn large_sparse_created_image() {
    let dir = tempdir();
    let img = dir.path().join("big.vhdx");
    create(&img, 16 << 40, "");
    let dev = open(&img, false);
    assert_eq!(dev.info().cluster_size, Some(32 << 20));
    dev.write_at(&[0x6b; 65536], 15 << 40).unwrap();
    let ext = diskimg_blockio::map_all(dev.as_ref(), 0, 16 << 40).unwrap();
    let kinds: Vec<_> = ext.iter().map(|e| (e.offset, e.len)).collect();
    assert_eq!(
        kinds,
        vec![
            (0, 15 << 40),
            (15 << 40, 32 << 20),
            ((15 << 40) + (32 << 20), (1 << 40) - (32 << 20))
        ]
    );
    assert!(ext[0].kind.is_zero() && ext[2].kind.is_zero());
    drop(dev);
    assert!(std::fs::metadata(&img).unwrap().len() < 128 << 20);
    assert_qemu_check_clean(&img, "vhdx");
    qemu_io(&img, "vhdx", &["read -P 0x6b 15T 64k", "read -P 0 14T 64k"]);
}

/// Growth (qemu cannot resize vhdx): qemu-img check stays clean, qemu sees the new
/// size, old data and zeroes in the new part (also the old partial last block's tail).
#[test]
fn grow_dynamic_images() {
    let dir = tempdir();
    for (i, (maker, opts)) in [("ours", "block_size=1M"), ("qemu", "block_size=2M")]
        .iter()
        .enumerate()
    {
        let img = dir.path().join(format!("g{i}.vhdx"));
        if *maker == "ours" {
            create(&img, (5 << 20) + 512, opts);
        } else {
            qemu_create(&img, "vhdx", opts, Some("5243392"));
        }
        let dev = open(&img, false);
        dev.write_at(&[0x77; 512], 5 << 20).unwrap();
        assert!(
            dev.resize(1 << 20, diskimg_blockio::Preallocation::Off, false)
                .is_err()
        );
        dev.resize(40 << 20, diskimg_blockio::Preallocation::Off, false)
            .unwrap();
        assert_eq!(dev.virtual_size(), 40 << 20);
        dev.write_at(&[0x78; 4096], 39 << 20).unwrap();
        drop(dev);
        assert_qemu_check_clean(&img, "vhdx");
        assert_eq!(qemu_info_json(&img, "vhdx")["virtual-size"], 40u64 << 20);
        qemu_io(
            &img,
            "vhdx",
            &[
                "read -P 0x77 5M 512",
                "read -P 0 5243392 1048064",
                "read -P 0 6M 33M",
                "read -P 0x78 39M 4k",
            ],
        );
        assert_eq!(open(&img, true).virtual_size(), 40 << 20);
    }
}

/// Fixed images grow too (qemu cannot resize vhdx): the new blocks are allocated
/// (FULLY_PRESENT, all data in the file), qemu-img check is clean and qemu reads the old
/// data, zeroes in the new part (and in the old partial last block's tail) and our writes
/// there; the result compares equal to the expected raw image. Shrinking is refused.
#[test]
fn grow_fixed_images() {
    use diskimg_blockio::Preallocation;
    let dir = tempdir();
    for (i, (maker, opts, old, new, prealloc)) in [
        (
            "qemu",
            "subformat=fixed,block_size=1M",
            (5u64 << 20) + 512,
            20u64 << 20,
            Preallocation::Off,
        ),
        (
            "ours",
            "subformat=fixed",
            24 << 20,
            72 << 20,
            Preallocation::Full,
        ),
        (
            "qemu",
            "subformat=fixed,block_size=2M",
            3 << 20,
            (9 << 20) + 4096,
            Preallocation::Falloc,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("f{i}.vhdx"));
        if maker == "ours" {
            create(&img, old, opts);
        } else {
            qemu_create(&img, "vhdx", opts, Some(&old.to_string()));
        }
        qemu_io(
            &img,
            "vhdx",
            &[
                "write -P 0x31 0 1M",
                &format!("write -P 0x32 {} 512", old - 512),
            ],
        );
        let file_before = std::fs::metadata(&img).unwrap().len();
        let dev = open(&img, false);
        assert!(dev.resize(old - 512, Preallocation::Off, true).is_err());
        assert!(dev.resize(old - 512, Preallocation::Off, false).is_err());
        dev.resize(new, prealloc, false).unwrap();
        assert_eq!(dev.virtual_size(), new);
        dev.write_at(&[0x33; 4096], new - 4096).unwrap();
        drop(dev);
        // Every new block is in the file.
        let bs = qemu_info_json(&img, "vhdx")["cluster-size"]
            .as_u64()
            .unwrap();
        let grown = new.div_ceil(bs) - old.div_ceil(bs);
        assert!(
            std::fs::metadata(&img).unwrap().len() >= file_before + grown * bs,
            "{i}: fixed blocks not allocated"
        );
        assert_qemu_check_clean(&img, "vhdx");
        assert_eq!(qemu_info_json(&img, "vhdx")["virtual-size"], new);
        let mut want = vec![0u8; usize::try_from(new).unwrap()];
        want[..1 << 20].fill(0x31);
        let o = usize::try_from(old).unwrap();
        want[o - 512..o].fill(0x32);
        let n = usize::try_from(new).unwrap();
        want[n - 4096..].fill(0x33);
        assert!(qemu_read_raw(&img, "vhdx") == want, "{i}: content");
        let raw = dir.path().join(format!("f{i}.raw"));
        std::fs::write(&raw, &want).unwrap();
        assert!(qemu_compare(&img, "vhdx", &raw, "raw"), "{i}");
        // qemu writes into the grown part of the (still fixed) image.
        qemu_io(
            &img,
            "vhdx",
            &[
                &format!("write -P 0x34 {} 64k", new / 2),
                &format!("read -P 0x34 {} 64k", new / 2),
            ],
        );
        assert_qemu_check_clean(&img, "vhdx");
        assert_eq!(open(&img, true).virtual_size(), new);
    }
}

#[test]
fn opening_and_reading_never_modifies_the_file() {
    let dir = tempdir();
    let img = dir.path().join("n.vhdx");
    qemu_img_ok(&["create", "-f", "vhdx", img.to_str().unwrap(), "8M"]);
    qemu_io(&img, "vhdx", &["write -P 0x11 0 1M"]);
    let before = std::fs::read(&img).unwrap();
    let dev = open(&img, false);
    let mut b = vec![0u8; 1 << 20];
    dev.read_at(&mut b, 0).unwrap();
    dev.flush().unwrap();
    drop(dev);
    assert!(std::fs::read(&img).unwrap() == before);
}
