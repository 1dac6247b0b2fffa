//! Images we create and write pass qemu-img check and compare identical; the files we
//! create match qemu's byte for byte apart from the random CID.

use diskimg_testutil::{
    assert_qemu_check_clean, pattern, qemu_compare, qemu_img_ok, qemu_io, qemu_read_raw, read_all,
    tempdir,
};

use crate::common::{SUBFORMATS, create, open, p, raw_file};

fn normalize_cid(bytes: &[u8]) -> Vec<u8> {
    // Replace the hex digits after "\nCID=" (the random content id) with "X".
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"\nCID=") {
            out.extend_from_slice(b"\nCID=X");
            i += 5;
            while i < bytes.len() && bytes[i].is_ascii_hexdigit() {
                i += 1;
            }
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Sparse files: header, descriptor text (CID normalised), then everything after the
/// 20-sector descriptor area; text files: the normalised text.
fn normalize_file(b: &[u8]) -> Vec<u8> {
    if b.starts_with(b"KDMV") && b.len() >= 512 * 21 {
        let area = &b[512..512 * 21];
        let end = area.iter().position(|&x| x == 0).unwrap_or(area.len());
        let mut out = b[..512].to_vec();
        out.extend(normalize_cid(&area[..end]));
        assert!(area[end..].iter().all(|&x| x == 0));
        out.extend_from_slice(&b[512 * 21..]);
        out
    } else {
        normalize_cid(b)
    }
}

fn first_diff(a: &[(String, Vec<u8>)], b: &[(String, Vec<u8>)]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!(
            "file sets differ: {:?} vs {:?}",
            a.iter().map(|x| &x.0).collect::<Vec<_>>(),
            b.iter().map(|x| &x.0).collect::<Vec<_>>()
        ));
    }
    for ((na, da), (nb, db)) in a.iter().zip(b) {
        if na != nb || da.len() != db.len() {
            return Some(format!("{na} ({}) vs {nb} ({})", da.len(), db.len()));
        }
        if let Some(i) = da.iter().zip(db).position(|(x, y)| x != y) {
            let lo = i.saturating_sub(16);
            return Some(format!(
                "{na} differs at {i}: {:?} vs {:?}",
                String::from_utf8_lossy(&da[lo..(i + 32).min(da.len())]),
                String::from_utf8_lossy(&db[lo..(i + 32).min(db.len())])
            ));
        }
    }
    None
}

fn dir_listing(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                normalize_file(&std::fs::read(e.path()).unwrap()),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn created_files_match_qemu() {
    let cases: &[(&str, u64)] = &[
        ("", 8 << 20),
        ("subformat=monolithicFlat", 8 << 20),
        ("subformat=twoGbMaxExtentSparse", 5 << 30),
        ("subformat=twoGbMaxExtentFlat", 4 << 20),
        ("subformat=streamOptimized", 8 << 20),
        ("adapter_type=lsilogic,compat6=on", 100 << 20),
        (
            "adapter_type=buslogic,hwversion=7,toolsversion=10240",
            3 << 20,
        ),
        ("adapter_type=legacyESX,zeroed_grain=on", 1000),
        ("subformat=twoGbMaxExtentSparse,zeroed_grain=on", 8 << 20),
        ("subformat=streamOptimized,zeroed_grain=on", 1 << 20),
        ("hwversion=undefined,compat6=on,toolsversion=abc", 1 << 20),
        ("subformat=twoGbMaxExtentSparse", 0),
        ("subformat=monolithicFlat", 0),
    ];
    for (opts, size) in cases {
        let qd = tempdir();
        let od = tempdir();
        let q = qd.path().join("img.vmdk");
        let o = od.path().join("img.vmdk");
        let mut args = vec!["create", "-q", "-f", "vmdk"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let qs = p(&q);
        let ss = size.to_string();
        args.extend([qs.as_str(), ss.as_str()]);
        qemu_img_ok(&args);
        create(&o, *size, opts).unwrap();
        let d = first_diff(&dir_listing(qd.path()), &dir_listing(od.path()));
        assert!(d.is_none(), "{opts}: {d:?}");
        if *size > 0 {
            // (qemu 10 asserts on descriptors without extents.)
            assert_qemu_check_clean(&o, "vmdk");
        }
    }
}

#[test]
fn our_images_pass_qemu_check_and_compare() {
    for sub in SUBFORMATS {
        let dir = tempdir();
        let img = dir.path().join("o.vmdk");
        let size = 8usize << 20;
        create(&img, size as u64, &format!("subformat={sub}")).unwrap();
        let dev = open(&img, false).unwrap();
        let mut expect = vec![0u8; size];
        if *sub == "streamOptimized" {
            let g = dev.compressed_write_granularity().unwrap() as usize;
            assert_eq!(g, 65536);
            for (i, grain) in [0usize, 1, 5, 64, 127].iter().enumerate() {
                let data = pattern(i as u64 + 1, g);
                dev.write_compressed(&data, (grain * g) as u64).unwrap();
                expect[grain * g..(grain + 1) * g].copy_from_slice(&data);
            }
            // Several grains in one call are deflated in parallel.
            let many = pattern(1234, 6 * g);
            dev.write_compressed(&many, (80 * g) as u64).unwrap();
            expect[80 * g..86 * g].copy_from_slice(&many);
            assert!(
                dev.write_compressed(&many, (84 * g) as u64).is_err(),
                "overlaps allocated grains"
            );
            assert!(
                dev.write_compressed(&many[..g + 1], (90 * g) as u64)
                    .is_err(),
                "partial grain"
            );
            // Plain writes to a fresh grain are compressed too (merged with zeroes).
            let data = pattern(99, 1000);
            dev.write_at(&data, 10 * 65536 + 100).unwrap();
            expect[10 * 65536 + 100..10 * 65536 + 1100].copy_from_slice(&data);
            assert_eq!(
                dev.map(10 * 65536, 65536).unwrap().kind,
                diskimg_blockio::ExtentKind::Compressed
            );
            // Rewriting an allocated compressed grain is refused, like qemu.
            let err = dev.write_at(&[1; 512], 0).unwrap_err().to_string();
            assert!(err.contains("streamOptimized"), "{err}");
        } else {
            assert_eq!(dev.compressed_write_granularity(), None);
            for (i, (off, len)) in [
                (0usize, 4096usize),
                (65000, 70000),
                (3 << 20, 1 << 20),
                (size - 512, 512),
                (100, 1),
            ]
            .iter()
            .enumerate()
            {
                let data = pattern(i as u64 + 7, *len);
                dev.write_at(&data, *off as u64).unwrap();
                expect[*off..*off + *len].copy_from_slice(&data);
            }
            dev.write_zeroes(3 << 20, 65536 + 4096, Default::default())
                .unwrap();
            expect[3 << 20..(3 << 20) + 65536 + 4096].fill(0);
        }
        dev.flush().unwrap();
        assert_eq!(read_all(dev.as_ref()), expect, "{sub}");
        drop(dev);
        assert_qemu_check_clean(&img, "vmdk");
        let raw = dir.path().join("expect.raw");
        raw_file(&raw, &expect);
        assert!(qemu_compare(&img, "vmdk", &raw, "raw"), "{sub}");
        // Reopen: same content.
        assert_eq!(
            read_all(open(&img, true).unwrap().as_ref()),
            expect,
            "{sub}"
        );
    }
}

#[test]
fn zeroed_grain_writes_zero_entries() {
    let dir = tempdir();
    let img = dir.path().join("z.vmdk");
    create(&img, 4 << 20, "zeroed_grain=on").unwrap();
    let dev = open(&img, false).unwrap();
    dev.write_at(&pattern(3, 256 << 10), 0).unwrap();
    dev.write_zeroes(65536, 131072, Default::default()).unwrap();
    let len_before = std::fs::metadata(&img).unwrap().len();
    dev.write_zeroes(1 << 20, 1 << 20, Default::default())
        .unwrap();
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        len_before,
        "zero grains allocate nothing"
    );
    drop(dev);
    assert_qemu_check_clean(&img, "vmdk");
    let dev = open(&img, true).unwrap();
    assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&img, "vmdk"));
    assert_eq!(
        dev.map(65536, 131072).unwrap().kind,
        diskimg_blockio::ExtentKind::Zero { offset: None }
    );
}

#[test]
fn we_create_delta_disks_qemu_follows() {
    let dir = tempdir();
    let base = dir.path().join("base.vmdk");
    let child = dir.path().join("child.vmdk");
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&base), "4M"]);
    qemu_io(&base, "vmdk", &["write -P 0xaa 0 2M"]);
    create(&child, 4 << 20, "backing_file=base.vmdk,backing_fmt=vmdk").unwrap();
    let dev = open(&child, false).unwrap();
    let parent = open(&base, true).unwrap();
    dev.set_backing(Some(parent)).unwrap();
    dev.write_at(&[0x55; 1000], 70000).unwrap();
    dev.flush().unwrap();
    let ours = read_all(dev.as_ref());
    drop(dev);
    assert_qemu_check_clean(&child, "vmdk");
    assert_eq!(ours, qemu_read_raw(&child, "vmdk"));
    assert_eq!(&ours[..1000], &[0xaa; 1000][..]);
    let info = diskimg_testutil::qemu_info_json(&child, "vmdk");
    assert_eq!(info["backing-filename"], "base.vmdk");
    // Bad backing format refused.
    assert!(
        create(
            &dir.path().join("x.vmdk"),
            1 << 20,
            "backing_file=base.vmdk,backing_fmt=qcow2"
        )
        .is_err()
    );
    assert!(
        create(
            &dir.path().join("y.vmdk"),
            1 << 20,
            "compat6=on,hwversion=7"
        )
        .is_err()
    );
    assert!(create(&dir.path().join("w.vmdk"), 1 << 20, "subformat=foo").is_err());
    let e = create(
        &dir.path().join("v.vmdk"),
        1 << 20,
        "subformat=monolithicFlat,zeroed_grain=on",
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "Flat image can't enable zeroed grain");
    assert!(create(&dir.path().join("u.vmdk"), 1 << 20, "adapter_type=scsi").is_err());
}

#[test]
fn first_write_changes_cid_like_qemu() {
    let dir = tempdir();
    let img = dir.path().join("c.vmdk");
    create(&img, 1 << 20, "").unwrap();
    let before =
        diskimg_testutil::qemu_info_json(&img, "vmdk")["format-specific"]["data"]["cid"].as_u64();
    let dev = open(&img, false).unwrap();
    dev.write_at(&[1; 512], 0).unwrap();
    dev.flush().unwrap();
    drop(dev);
    let after =
        diskimg_testutil::qemu_info_json(&img, "vmdk")["format-specific"]["data"]["cid"].as_u64();
    assert_ne!(before, after);
    assert_qemu_check_clean(&img, "vmdk");
}
