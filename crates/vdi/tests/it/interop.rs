//! Images qemu writes read back identical; images we write pass qemu-img check/compare.

use diskimg_blockio::{Driver, MemStorage, RepairMode, Storage, map_chain};
use diskimg_testutil::{
    assert_qemu_check_clean, pattern, qemu_check_json, qemu_compare, qemu_create, qemu_img,
    qemu_img_ok, qemu_info_json, qemu_io, qemu_map_json, qemu_read_raw, read_all, tempdir,
};

use crate::{create, open};

#[test]
fn qemu_images_read_identical() {
    let dir = tempdir();
    for (name, opts, size) in [
        ("dyn.vdi", "static=off", "5M"),
        ("static.vdi", "static=on", "3M"),
        ("odd.vdi", "static=off", "3001k"),
    ] {
        let p = dir.path().join(name);
        qemu_create(&p, "vdi", opts, Some(size));
        qemu_io(
            &p,
            "vdi",
            &[
                "write -P 0xab 0 4k",
                "write -P 0x11 1048000 2000",
                "write -P 0x22 2M 900k",
            ],
        );
        let dev = open(&p, true);
        assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&p, "vdi"), "{name}");
        let info = qemu_info_json(&p, "vdi");
        assert_eq!(info["virtual-size"].as_u64().unwrap(), dev.virtual_size());
        assert_eq!(
            info["cluster-size"].as_u64(),
            dev.info().cluster_size,
            "{name}"
        );
        assert_eq!(dev.check(RepairMode::None).unwrap().corruptions, 0);
    }
}

#[test]
fn large_sparse_qemu_image() {
    let dir = tempdir();
    let p = dir.path().join("big.vdi");
    qemu_img_ok(&["create", "-q", "-f", "vdi", &p.to_string_lossy(), "2T"]);
    qemu_io(
        &p,
        "vdi",
        &["write -P 0x5a 1T 64k", "write -P 0x33 2047G 4k"],
    );
    let dev = open(&p, true);
    assert_eq!(dev.virtual_size(), 2 << 40);
    let mut buf = vec![0u8; 65536 + 512];
    dev.read_at(&mut buf, (1 << 40) - 512).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0));
    assert!(buf[512..].iter().all(|&b| b == 0x5a));
    let mut b2 = vec![0u8; 4096];
    dev.read_at(&mut b2, 2047 << 30).unwrap();
    assert!(b2.iter().all(|&b| b == 0x33));
    let ours = map_chain(dev.as_ref(), 0, dev.virtual_size()).unwrap();
    let theirs = qemu_map_json(&p, "vdi");
    assert_map_eq(&ours, &theirs);
}

/// Compares our map entries with qemu-img map's JSON, field by field.
fn assert_map_eq(ours: &[diskimg_blockio::MapEntry], theirs: &serde_json::Value) {
    let theirs = theirs.as_array().unwrap();
    assert_eq!(ours.len(), theirs.len(), "ours {ours:?}\ntheirs {theirs:?}");
    for (o, t) in ours.iter().zip(theirs) {
        assert_eq!(o.start, t["start"].as_u64().unwrap(), "{o:?} {t}");
        assert_eq!(o.length, t["length"].as_u64().unwrap(), "{o:?} {t}");
        assert_eq!(o.present, t["present"].as_bool().unwrap(), "{o:?} {t}");
        assert_eq!(o.zero, t["zero"].as_bool().unwrap(), "{o:?} {t}");
        assert_eq!(o.data, t["data"].as_bool().unwrap(), "{o:?} {t}");
        assert_eq!(o.offset, t["offset"].as_u64(), "{o:?} {t}");
    }
}

#[test]
fn our_images_pass_qemu_check_and_compare() {
    let dir = tempdir();
    for (name, opts) in [
        ("dyn.vdi", ""),
        ("static.vdi", "static=on"),
        ("full.vdi", "static=on,preallocation=full"),
        (
            "falloc.vdi",
            "preallocation=falloc,extent_size_hint=1M,nocow=off",
        ),
    ] {
        let p = dir.path().join(name);
        let size = 6 << 20;
        create(&p, size, opts);
        assert_qemu_check_clean(&p, "vdi");
        let dev = open(&p, false);
        let mut expect = vec![0u8; size as usize];
        for (i, (off, len)) in [
            (0usize, 4096usize),
            (1048000, 2000),
            (3 << 20, 1 << 20),
            (5 << 20, 777),
        ]
        .into_iter()
        .enumerate()
        {
            let data = pattern(i as u64 + 1, len);
            dev.write_at(&data, off as u64).unwrap();
            expect[off..off + len].copy_from_slice(&data);
        }
        dev.flush().unwrap();
        drop(dev);
        assert_qemu_check_clean(&p, "vdi");
        let raw = dir.path().join(format!("{name}.raw"));
        std::fs::write(&raw, &expect).unwrap();
        assert!(qemu_compare(&p, "vdi", &raw, "raw"), "{name}");
        assert_eq!(qemu_read_raw(&p, "vdi"), expect);
        let dev = open(&p, true);
        assert_eq!(read_all(dev.as_ref()), expect);
        if !opts.contains("static") {
            let ours = map_chain(dev.as_ref(), 0, size).unwrap();
            assert_map_eq(&ours, &qemu_map_json(&p, "vdi"));
        }
    }
}

#[test]
fn created_layout_matches_qemu() {
    let dir = tempdir();
    for (opts, size) in [
        ("static=off", 5u64 << 20),
        ("static=on", 3 << 20),
        ("static=off", 0),
    ] {
        let q = dir.path().join("q.vdi");
        let d = dir.path().join("d.vdi");
        qemu_create(&q, "vdi", opts, Some(&size.to_string()));
        create(&d, size, opts);
        let qb = std::fs::read(&q).unwrap();
        let db = std::fs::read(&d).unwrap();
        assert_eq!(qb.len(), db.len(), "{opts}");
        // Identical apart from the two random UUIDs (image and last snapshot).
        assert_eq!(qb[..392], db[..392], "{opts}");
        assert_eq!(qb[424..], db[424..], "{opts}");
        assert_ne!(qb[392..424], db[392..424]);
    }
}

#[test]
fn static_map_agrees_on_offsets() {
    let dir = tempdir();
    let p = dir.path().join("s.vdi");
    create(&p, 3 << 20, "static=on");
    let dev = open(&p, false);
    dev.write_at(&[0xab; 4096], 1 << 20).unwrap();
    dev.flush().unwrap();
    let ours = map_chain(dev.as_ref(), 0, 3 << 20).unwrap();
    let theirs = qemu_map_json(&p, "vdi");
    let theirs = theirs.as_array().unwrap();
    // Same extents and host offsets; qemu marks host holes data+zero, we mark them zero.
    assert_eq!(ours.len(), theirs.len(), "{ours:?} {theirs:?}");
    for (o, t) in ours.iter().zip(theirs) {
        assert_eq!(o.start, t["start"].as_u64().unwrap());
        assert_eq!(o.length, t["length"].as_u64().unwrap());
        assert_eq!(o.zero, t["zero"].as_bool().unwrap());
        assert_eq!(o.offset, t["offset"].as_u64());
    }
}

#[test]
fn check_matches_qemu_on_corrupt_maps() {
    let dir = tempdir();
    let p = dir.path().join("c.vdi");
    qemu_img_ok(&["create", "-q", "-f", "vdi", &p.to_string_lossy(), "8M"]);
    qemu_io(
        &p,
        "vdi",
        &["write -P 1 0 1M", "write -P 2 1M 1M", "write -P 3 4M 4k"],
    );
    let good = std::fs::read(&p).unwrap();
    let put =
        |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("duplicate", {
            let mut b = good.clone();
            put(&mut b, 512 + 4, 0);
            b
        }),
        ("too large", {
            let mut b = good.clone();
            put(&mut b, 512 + 8 * 4 - 4, 100);
            b
        }),
        ("count", {
            let mut b = good.clone();
            put(&mut b, 388, 7);
            b
        }),
        ("several", {
            let mut b = good.clone();
            put(&mut b, 512 + 12, 2);
            put(&mut b, 512 + 16, 0xffff_0000);
            b
        }),
        ("clean", good.clone()),
    ];
    for (name, bytes) in cases {
        std::fs::write(&p, &bytes).unwrap();
        let (v, code) = qemu_check_json(&p, "vdi");
        let qemu_corrupt = v.get("corruptions").and_then(|x| x.as_u64()).unwrap_or(0);
        let s: std::sync::Arc<dyn Storage> = std::sync::Arc::new(MemStorage::from_vec(bytes));
        let dev = diskimg_vdi::DRIVER
            .open(s, &diskimg_blockio::OpenOptions::new().read_only(true))
            .unwrap();
        let r = dev.check(RepairMode::None).unwrap();
        assert_eq!(r.corruptions, qemu_corrupt, "{name}: {v} {:?}", r.messages);
        assert_eq!(code, if qemu_corrupt > 0 { 2 } else { 0 }, "{name}");
        // qemu's stderr lines are our messages.
        let out = qemu_img(&["check", "-f", "vdi", &p.to_string_lossy()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        for m in &r.messages {
            assert!(stderr.contains(m.as_str()), "{name}: {m} not in {stderr}");
        }
        assert!(dev.check(RepairMode::All).unwrap_err().is_unsupported());
    }
}

/// Rebuilds a qemu image with VirtualBox-style layout choices: header size 0x190, the map
/// at `bmap_off` and the data area at `data_off`.
fn relayout(q: &[u8], bmap_off: usize, data_off: usize) -> Vec<u8> {
    let blocks = u32::from_le_bytes(q[384..388].try_into().unwrap()) as usize;
    let od = u32::from_le_bytes(q[344..348].try_into().unwrap()) as usize;
    let mut out = vec![0u8; data_off];
    out[..512].copy_from_slice(&q[..512]);
    out[72..76].copy_from_slice(&0x190u32.to_le_bytes());
    out[..40].fill(0);
    out[..39].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>");
    out[340..344].copy_from_slice(&(bmap_off as u32).to_le_bytes());
    out[344..348].copy_from_slice(&(data_off as u32).to_le_bytes());
    // Bytes between the header and the map must survive our rewrites.
    for b in out.iter_mut().take(bmap_off).skip(512) {
        *b = 0xee;
    }
    out[bmap_off..bmap_off + blocks * 4].copy_from_slice(&q[512..512 + blocks * 4]);
    out.extend_from_slice(&q[od..]);
    out
}

#[test]
fn virtualbox_style_layouts() {
    let dir = tempdir();
    let q = dir.path().join("q.vdi");
    qemu_img_ok(&["create", "-q", "-f", "vdi", &q.to_string_lossy(), "6M"]);
    qemu_io(&q, "vdi", &["write -P 0x31 0 1M", "write -P 0x32 3M 64k"]);
    let qb = std::fs::read(&q).unwrap();
    for (bmap_off, data_off) in [(512usize, 1usize << 20), (2048, 4096)] {
        let p = dir.path().join("vb.vdi");
        std::fs::write(&p, relayout(&qb, bmap_off, data_off)).unwrap();
        let mut expect = qemu_read_raw(&p, "vdi");
        assert_eq!(expect, qemu_read_raw(&q, "vdi"));
        let dev = open(&p, false);
        assert_eq!(read_all(dev.as_ref()), expect);
        let data = pattern(9, 300_000);
        dev.write_at(&data, (5 << 20) - 100_000).unwrap();
        expect[(5 << 20) - 100_000..(5 << 20) + 200_000].copy_from_slice(&data);
        dev.flush().unwrap();
        drop(dev);
        assert_qemu_check_clean(&p, "vdi");
        assert_eq!(qemu_read_raw(&p, "vdi"), expect);
        let after = std::fs::read(&p).unwrap();
        assert!(after[512..bmap_off].iter().all(|&b| b == 0xee));
        assert_eq!(after[..64], relayout(&qb, bmap_off, data_off)[..64]);
    }
}

#[test]
fn odd_disk_size_rounds_up_like_qemu() {
    let dir = tempdir();
    let p = dir.path().join("odd.vdi");
    qemu_img_ok(&["create", "-q", "-f", "vdi", &p.to_string_lossy(), "2M"]);
    let mut b = std::fs::read(&p).unwrap();
    b[368..376].copy_from_slice(&((1u64 << 20) + 1000).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let dev = open(&p, true);
    assert_eq!(
        Some(dev.virtual_size()),
        qemu_info_json(&p, "vdi")["virtual-size"].as_u64()
    );
    assert_eq!(dev.virtual_size(), (1 << 20) + 1024);
}

#[test]
fn create_errors_match_qemu() {
    let dir = tempdir();
    for (size, opts) in [
        (562_949_819_203_585u64, ""),
        (1 << 20, "preallocation=metadata"),
        (1 << 20, "preallocation=bogus"),
        (1 << 20, "static=maybe"),
    ] {
        let p = dir.path().join("e.vdi");
        let mut args = vec!["create", "-q", "-f", "vdi"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let ps = p.to_string_lossy().into_owned();
        let ss = size.to_string();
        args.extend([ps.as_str(), ss.as_str()]);
        let out = qemu_img(&args);
        assert!(!out.status.success());
        let theirs = String::from_utf8_lossy(&out.stderr).into_owned();
        let s: std::sync::Arc<dyn Storage> = std::sync::Arc::new(MemStorage::new());
        let mut req = diskimg_blockio::CreateRequest::new(
            size,
            diskimg_blockio::OptionList::parse(opts).unwrap(),
        );
        let ours = diskimg_vdi::DRIVER
            .create(s, &mut req)
            .unwrap_err()
            .to_string();
        let msg = ours.rsplit("unsupported: ").next().unwrap();
        assert!(theirs.contains(msg), "ours: {ours}\ntheirs: {theirs}");
    }
}
