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
    // Data, a zero 4 KiB block, data: one grain/cluster that zero detection splits.
    img[14 << 20..(14 << 20) + 4096].copy_from_slice(&pattern(3, 4096));
    img[(14 << 20) + 8192..(14 << 20) + 12288].copy_from_slice(&pattern(4, 4096));
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

/// Issue 15.5: qemu-img compresses streamOptimized output whether or not `-c` is given;
/// so does diskimg (it failed with "Could not write to allocated cluster" on a grain
/// that zero detection split in two).
#[test]
fn stream_optimized_without_c_is_compressed() {
    let dir = tempdir();
    let src = source(dir.path());
    let q = dir.path().join("q.vmdk");
    let stream = ["-O", "vmdk", "-o", "subformat=streamOptimized"];
    let mut args = vec!["convert", "-f", "raw"];
    args.extend(stream);
    qemu_img_ok(&[args.as_slice(), &[s(&src), s(&q)]].concat());
    let qsize = std::fs::metadata(&q).unwrap().len();
    for extra in [vec!["-m", "1"], vec![], vec!["-m", "8", "-W"]] {
        let out = dir.path().join("d.vmdk");
        let _ = std::fs::remove_file(&out);
        diskimg_ok(&[args.as_slice(), &extra, &[s(&src), s(&out)]].concat());
        assert!(qemu_compare(&src, "raw", &out, "vmdk"), "{extra:?}");
        assert_qemu_check_clean(&out, "vmdk");
        let dsize = std::fs::metadata(&out).unwrap().len();
        assert!(
            dsize * 100 <= qsize * 105,
            "{extra:?}: {dsize} vs qemu's {qsize}"
        );
        // Compressed: far smaller than the 16 MiB of data the source holds.
        assert!(dsize < 8 << 20, "{extra:?}: {dsize} bytes, not compressed");
    }
}

/// `convert -n` into an existing, empty streamOptimized image works as in qemu; a second
/// `-n` into the now allocated image fails in both tools.
#[test]
fn stream_optimized_existing_target() {
    let dir = tempdir();
    let src = source(dir.path());
    let size = std::fs::metadata(&src).unwrap().len().to_string();
    for (tool, name) in [("qemu", "q.vmdk"), ("diskimg", "d.vmdk")] {
        let t = dir.path().join(name);
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&t),
            &size,
        ]);
        let args = ["convert", "-n", "-f", "raw", "-O", "vmdk", s(&src), s(&t)];
        let run = |args: &[&str]| match tool {
            "qemu" => diskimg_testutil::qemu_img(args),
            _ => diskimg(args),
        };
        let first = run(&args);
        assert!(first.status.success(), "{tool}: {first:?}");
        assert!(qemu_compare(&src, "raw", &t, "vmdk"), "{tool}");
        assert_qemu_check_clean(&t, "vmdk");
        let again = run(&args);
        assert_eq!(again.status.code(), Some(1), "{tool}: {again:?}");
        assert!(
            String::from_utf8_lossy(&again.stderr)
                .contains("Could not write to allocated cluster for streamOptimized"),
            "{tool}: {again:?}"
        );
    }
}
