//! convert's speed-related flags: `-t` cache modes and compressed writes handed to the
//! target as runs of units, on every writable format, checked with qemu-img.

use std::path::{Path, PathBuf};

use diskimg_testutil::{assert_qemu_check_clean, pattern, qemu_compare, qemu_img_ok, tempdir};

use crate::{diskimg, diskimg_ok, s};

/// 24 MiB raw: compressible text, incompressible data, zero data and holes, with an
/// odd tail so compressed writes end on a partial unit.
fn source(dir: &Path) -> PathBuf {
    let mut img = vec![0u8; (24 << 20) + 4096 + 512];
    let text: Vec<u8> = b"diskimg converts disk images; qemu-img is the reference. "
        .iter()
        .copied()
        .cycle()
        .take(6 << 20)
        .collect();
    img[..6 << 20].copy_from_slice(&text);
    img[8 << 20..10 << 20].copy_from_slice(&pattern(7, 2 << 20));
    img[(12 << 20) + 300..(12 << 20) + 900].fill(0x5a);
    let n = img.len();
    img[n - 700..].copy_from_slice(&pattern(9, 700));
    let p = dir.join("src.raw");
    std::fs::write(&p, &img).unwrap();
    p
}

#[test]
fn cache_modes_give_identical_clean_images() {
    let dir = tempdir();
    let src = source(dir.path());
    for fmt in ["qcow2", "vmdk", "vdi", "vhdx", "vpc"] {
        for t in ["unsafe", "writeback", "none"] {
            let out = dir.path().join(format!("o-{t}.{fmt}"));
            diskimg_ok(&["convert", "-t", t, "-f", "raw", "-O", fmt, s(&src), s(&out)]);
            assert!(qemu_compare(&src, "raw", &out, fmt), "{fmt} -t {t}");
            if fmt != "vpc" {
                assert_qemu_check_clean(&out, fmt);
            }
        }
    }
    let o = diskimg(&["convert", "-t", "bogus", "-O", "raw", s(&src), "x.raw"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "diskimg: Invalid cache option: bogus"
    );
}

#[test]
fn stream_optimized_compressed_matches_qemu() {
    let dir = tempdir();
    let src = source(dir.path());
    let q = dir.path().join("q.vmdk");
    qemu_img_ok(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&src),
        s(&q),
    ]);
    let qsize = std::fs::metadata(&q).unwrap().len();
    for extra in [vec!["-m", "1"], vec!["-m", "4"], vec!["-m", "8", "-W"]] {
        let out = dir.path().join("d.vmdk");
        let mut args = vec!["convert", "-c", "-f", "raw", "-O", "vmdk"];
        args.extend(["-o", "subformat=streamOptimized"]);
        args.extend(extra.iter().copied());
        args.extend([s(&src), s(&out)]);
        diskimg_ok(&args);
        assert!(qemu_compare(&src, "raw", &out, "vmdk"), "{extra:?}");
        assert_qemu_check_clean(&out, "vmdk");
        let dsize = std::fs::metadata(&out).unwrap().len();
        assert!(
            dsize * 100 <= qsize * 105,
            "{extra:?}: {dsize} bytes vs qemu's {qsize}"
        );
    }
}

#[test]
fn qcow2_compressed_matches_qemu() {
    let dir = tempdir();
    let src = source(dir.path());
    for ctype in ["zlib", "zstd"] {
        let opt = format!("compression_type={ctype}");
        let q = dir.path().join("q.qcow2");
        qemu_img_ok(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &opt,
            s(&src),
            s(&q),
        ]);
        let qsize = std::fs::metadata(&q).unwrap().len();
        for extra in [vec!["-m", "1"], vec!["-m", "4"], vec!["-m", "8", "-W"]] {
            let out = dir.path().join("d.qcow2");
            let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opt];
            args.extend(extra.iter().copied());
            args.extend([s(&src), s(&out)]);
            diskimg_ok(&args);
            assert!(
                qemu_compare(&src, "raw", &out, "qcow2"),
                "{ctype} {extra:?}"
            );
            assert_qemu_check_clean(&out, "qcow2");
            let dsize = std::fs::metadata(&out).unwrap().len();
            assert!(
                dsize * 100 <= qsize * 105,
                "{ctype} {extra:?}: {dsize} bytes vs qemu's {qsize}"
            );
        }
    }
}
