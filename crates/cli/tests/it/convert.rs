//! convert raw→raw: sparse, identical, options, concatenation.

use diskimg_testutil::{
    qemu_compare, qemu_img, qemu_img_ok, qemu_map_json, qemu_read_raw, tempdir,
};

use crate::{FORMATS, code, diskimg, diskimg_ok, qemu_raw, s};

/// Bytes of the `data: true` extents of a `qemu-img map --output=json` answer.
pub(crate) fn data_bytes(map: &serde_json::Value) -> u64 {
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn sparse_convert_matches_qemu() {
    let dir = tempdir();
    // Data, explicit zero data (written as bytes, detected by -S), and holes.
    let src = qemu_raw(
        dir.path(),
        "src.raw",
        "64M",
        &[
            "write -P 0x11 0 64k",
            "write -P 0 1M 1M",
            "write -P 0x22 5000k 3k",
            "write -P 0x33 40M 2M",
        ],
    );
    for fmt in FORMATS {
        for extra in [
            vec![],
            vec!["-m", "4", "-W"],
            vec!["-m", "1"],
            vec!["-S", "64k"],
            vec!["-p", "-m", "2"],
        ] {
            let ours = dir.path().join(format!("ours.{fmt}"));
            let theirs = dir.path().join(format!("theirs.{fmt}"));
            let mut a = vec!["convert", "-f", "raw", "-O", fmt];
            a.extend(&extra);
            a.extend([s(&src), s(&ours)]);
            diskimg_ok(&a);
            let mut q = vec!["convert", "-f", "raw", "-O", fmt];
            q.extend(&extra);
            q.extend([s(&src), s(&theirs)]);
            qemu_img_ok(&q);
            assert!(qemu_compare(&src, "raw", &ours, fmt), "{fmt} {extra:?}");
            // No more data allocated than qemu's own conversion.
            let (mo, mq) = (qemu_map_json(&ours, fmt), qemu_map_json(&theirs, fmt));
            assert!(
                data_bytes(&mo) <= data_bytes(&mq),
                "{fmt} {extra:?}: {mo} vs {mq}"
            );
            if *fmt == "raw" && extra.is_empty() {
                assert_eq!(mo, mq, "raw map after convert");
            }
        }
    }
}

#[test]
fn fully_allocated_and_into_existing_targets() {
    let dir = tempdir();
    let src = qemu_raw(dir.path(), "src.raw", "8M", &["write -P 0x44 1M 64k"]);
    let full = dir.path().join("full.raw");
    diskimg_ok(&[
        "convert",
        "-q",
        "-S",
        "0",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&src),
        s(&full),
    ]);
    let qfull = dir.path().join("qfull.raw");
    qemu_img_ok(&[
        "convert",
        "-S",
        "0",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&src),
        s(&qfull),
    ]);
    assert_eq!(qemu_map_json(&full, "raw"), qemu_map_json(&qfull, "raw"));
    assert!(qemu_compare(&src, "raw", &full, "raw"));

    // -n into a target full of junk: zero ranges must be written.
    let junk = qemu_raw(dir.path(), "junk.raw", "8M", &["write -P 0xee 0 8M"]);
    diskimg_ok(&["convert", "-n", "-f", "raw", "-O", "raw", s(&src), s(&junk)]);
    assert!(qemu_compare(&src, "raw", &junk, "raw"));
    // A smaller existing target is refused with qemu's message.
    let small = qemu_raw(dir.path(), "small.raw", "1M", &[]);
    let a = [
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&src),
        s(&small),
    ];
    let (o, q) = (diskimg(&a), qemu_img(&a));
    assert_eq!(code(&o), 1);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).replace("diskimg", "qemu-img"),
        String::from_utf8_lossy(&q.stderr)
    );
    // --target-is-zero without -n is refused, like qemu.
    let t = dir.path().join("t.raw");
    let a = [
        "convert",
        "--target-is-zero",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&src),
        s(&t),
    ];
    assert_eq!(code(&diskimg(&a)), 1);
    assert_eq!(qemu_img(&a).status.code(), Some(1));
    // -n --target-is-zero into a zero target.
    let zt = qemu_raw(dir.path(), "zt.raw", "8M", &[]);
    diskimg_ok(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-O",
        "raw",
        s(&src),
        s(&zt),
    ]);
    assert!(qemu_compare(&src, "raw", &zt, "raw"));
    // Invalid -S and -m values.
    for bad in [["-S", "1000"], ["-m", "0"], ["-m", "17"]] {
        let mut a = vec!["convert", "-O", "raw"];
        a.extend(bad);
        a.extend([s(&src), s(&t)]);
        assert_eq!(code(&diskimg(&a)), 1, "{bad:?}");
        assert_eq!(qemu_img(&a).status.code(), Some(1), "{bad:?}");
    }
    // Compression into raw is refused (no compressed writes), as by qemu.
    let a = ["convert", "-c", "-O", "raw", s(&src), s(&t)];
    assert_eq!(code(&diskimg(&a)), 1);
    assert_eq!(qemu_img(&a).status.code(), Some(1));
}

#[test]
fn several_sources_are_concatenated() {
    let dir = tempdir();
    let a = qemu_raw(dir.path(), "a.raw", "1M", &["write -P 1 0 4k"]);
    let b = qemu_raw(dir.path(), "b.raw", "3M", &["write -P 2 2M 512"]);
    let c = qemu_raw(dir.path(), "c.raw", "64k", &["write -P 3 0 64k"]);
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("theirs.raw");
    diskimg_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&a),
        s(&b),
        s(&c),
        s(&ours),
    ]);
    qemu_img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&a),
        s(&b),
        s(&c),
        s(&theirs),
    ]);
    assert_eq!(qemu_read_raw(&ours, "raw"), qemu_read_raw(&theirs, "raw"));
    // Raw images have no internal snapshots.
    let o = diskimg(&["convert", "-l", "snapshot.name=x", s(&a), s(&ours)]);
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("snapshot"));
}

#[test]
fn source_snapshots_convert_like_qemu() {
    let dir = tempdir();
    let img = dir.path().join("s.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    crate::qemu_io_raw(&["-c", "write -P 1 0 1M", s(&img)]);
    qemu_img_ok(&["snapshot", "-c", "first", s(&img)]);
    crate::qemu_io_raw(&["-c", "write -P 2 0 512k", s(&img)]);
    qemu_img_ok(&["snapshot", "-c", "second", s(&img)]);
    crate::qemu_io_raw(&["-c", "write -P 3 3M 4k", s(&img)]);
    for sel in ["snapshot.name=first", "snapshot.id=2", "second", "1"] {
        let ours = dir.path().join("ours.raw");
        let theirs = dir.path().join("theirs.raw");
        diskimg_ok(&["convert", "-l", sel, "-O", "raw", s(&img), s(&ours)]);
        qemu_img_ok(&["convert", "-l", sel, "-O", "raw", s(&img), s(&theirs)]);
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{sel}"
        );
    }
    let o = diskimg(&[
        "convert",
        "-l",
        "nope",
        "-O",
        "raw",
        s(&img),
        s(&dir.path().join("x")),
    ]);
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Can't find snapshot"));
}

#[test]
fn large_sparse_image_converts_sparsely() {
    let dir = tempdir();
    let src = dir.path().join("big.raw");
    diskimg_ok(&["create", "-q", "-f", "raw", s(&src), "100G"]);
    diskimg_ok(&[
        "io",
        "-f",
        "raw",
        "-c",
        "write -P 0x77 99G 64k",
        "-c",
        "write -P 1 0 4k",
        s(&src),
    ]);
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("theirs.raw");
    diskimg_ok(&["convert", "-f", "raw", "-O", "raw", s(&src), s(&ours)]);
    // Sparse all the way: only the two written ranges are allocated (no timing assertion;
    // speed is measured in benches/).
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&ours).unwrap().blocks() * 512;
    assert!(allocated <= 4 << 20, "{allocated} bytes allocated");
    qemu_img_ok(&["convert", "-f", "raw", "-O", "raw", s(&src), s(&theirs)]);
    assert_eq!(qemu_map_json(&ours, "raw"), qemu_map_json(&theirs, "raw"));
    let o = diskimg(&["compare", "-f", "raw", "-F", "raw", s(&ours), s(&theirs)]);
    assert_eq!(code(&o), 0);
}

/// A source whose size is not a multiple of 4 KiB, written out in full (a dense file, all
/// of it data): a zero tail shorter than a block is left sparse as qemu-img leaves it,
/// and a tail with data is written.
#[test]
fn short_zero_tail_stays_sparse_like_qemu() {
    let dir = tempdir();
    for (size, at) in [(1_079_296, 0), (1_079_296, 1_079_295), (1_049_088, 4096)] {
        let src = dir.path().join("dense.raw");
        let mut bytes = vec![0u8; size];
        bytes[at] = 1;
        std::fs::write(&src, &bytes).unwrap();
        for fmt in ["raw", "qcow2"] {
            let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
            diskimg_ok(&["convert", "-f", "raw", "-O", fmt, s(&src), s(&ours)]);
            qemu_img_ok(&["convert", "-f", "raw", "-O", fmt, s(&src), s(&theirs)]);
            assert!(qemu_compare(&src, "raw", &ours, fmt), "{size} {at} {fmt}");
            let (mo, mq) = (qemu_map_json(&ours, fmt), qemu_map_json(&theirs, fmt));
            assert_eq!(
                data_bytes(&mo),
                data_bytes(&mq),
                "{size} {at} {fmt}: {mo} vs {mq}"
            );
            if fmt == "raw" {
                assert_eq!(mo, mq, "{size} {at}");
            }
        }
    }
}
