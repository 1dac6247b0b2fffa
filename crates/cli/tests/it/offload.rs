//! `convert -C` (copy offloading through copy_file_range) against qemu-img: content
//! (`qemu-img compare`), consistency (`qemu-img check`) and qemu-img's option errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use diskimg_testutil::{assert_qemu_check_clean, qemu_compare, qemu_img_ok, qemu_io, tempdir};

use crate::{code, diskimg, diskimg_ok, qemu_raw, s};

/// 5 MiB + 512: the last cluster is partial for every cluster size.
const ODD: &str = "5243392";

const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1000k 1500k",
    "write -P 0 2600k 64k",
    "write -P 0x33 3m 3k",
    "write -P 0 4m 1m",
    "write -P 0x44 5m 512",
];

/// A qcow2 chain: a base with data, an overlay with more data on top.
fn qcow2_chain(dir: &Path, cluster: &str) -> PathBuf {
    let base = dir.join(format!("base-{cluster}.qcow2"));
    let top = dir.join(format!("top-{cluster}.qcow2"));
    let o = format!("cluster_size={cluster}");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &o, s(&base), ODD]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 0x55 0 2m", "write -P 0x66 4m 1m"],
    );
    let ob = format!("{o},backing_file={},backing_fmt=qcow2", s(&base));
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &ob, s(&top)]);
    qemu_io(&top, "qcow2", WRITES);
    top
}

fn convert_c(src: &Path, fmt: &str, opts: &[&str], dst: &Path) {
    let mut a = vec!["convert", "-C", "-O", fmt];
    a.extend(opts);
    a.extend([s(src), s(dst)]);
    diskimg_ok(&a);
}

#[test]
fn raw_sources_to_raw_and_qcow2() {
    let dir = tempdir();
    let src = qemu_raw(dir.path(), "src.raw", ODD, WRITES);
    let dst = dir.path().join("dst.raw");
    for extra in [vec![], vec!["-m", "1"], vec!["-m", "4", "-W"]] {
        convert_c(&src, "raw", &extra, &dst);
        assert!(qemu_compare(&src, "raw", &dst, "raw"), "{extra:?}");
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 5243392);
    }
    for cluster in ["512", "64k", "2M"] {
        for ext in ["off", "on"] {
            if ext == "on" && cluster == "512" {
                continue; // extended L2 needs 16 KiB clusters at least
            }
            let dst = dir.path().join(format!("dst-{cluster}-{ext}.qcow2"));
            let o = format!("cluster_size={cluster},extended_l2={ext}");
            convert_c(&src, "qcow2", &["-o", &o], &dst);
            assert!(qemu_compare(&src, "raw", &dst, "qcow2"), "{o}");
            assert_qemu_check_clean(&dst, "qcow2");
        }
    }
}

#[test]
fn qcow2_chains_to_raw_and_qcow2() {
    let dir = tempdir();
    for cluster in ["512", "2M"] {
        let top = qcow2_chain(dir.path(), cluster);
        let raw = dir.path().join(format!("out-{cluster}.raw"));
        convert_c(&top, "raw", &[], &raw);
        assert!(qemu_compare(&top, "qcow2", &raw, "raw"), "{cluster}");
        for oc in ["512", "64k", "2M"] {
            let q = dir.path().join(format!("out-{cluster}-{oc}.qcow2"));
            let o = format!("cluster_size={oc}");
            convert_c(&top, "qcow2", &["-o", &o, "-m", "2"], &q);
            assert!(qemu_compare(&top, "qcow2", &q, "qcow2"), "{cluster}->{oc}");
            assert_qemu_check_clean(&q, "qcow2");
        }
    }
}

#[test]
fn existing_targets_and_other_formats() {
    let dir = tempdir();
    let src = qemu_raw(dir.path(), "src.raw", ODD, WRITES);
    // -n into an existing qcow2 full of other data: clusters overwritten in place.
    let t = dir.path().join("t.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&t), ODD]);
    qemu_io(&t, "qcow2", &["write -P 0x77 0 5m"]);
    diskimg_ok(&["convert", "-C", "-n", "-O", "qcow2", s(&src), s(&t)]);
    assert!(qemu_compare(&src, "raw", &t, "qcow2"));
    assert_qemu_check_clean(&t, "qcow2");
    // Formats without offloading fall back to reads and writes, like qemu-img, zero
    // detection included (the zero data at 2600k is not allocated).
    for fmt in ["vdi", "vpc", "vmdk", "vhdx"] {
        let d = dir.path().join(format!("d.{fmt}"));
        convert_c(&src, fmt, &[], &d);
        let q = dir.path().join(format!("q.{fmt}"));
        qemu_img_ok(&["convert", "-C", "-O", fmt, s(&src), s(&q)]);
        let data = |p: &Path| -> u64 {
            diskimg_testutil::qemu_map_json(p, fmt)
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["data"] == true)
                .map(|e| e["length"].as_u64().unwrap())
                .sum()
        };
        assert!(data(&d) <= data(&q), "{fmt}: {} > {}", data(&d), data(&q));
        let back = dir.path().join(format!("back-{fmt}.raw"));
        convert_c(&d, "raw", &[], &back);
        assert!(qemu_compare(&src, "raw", &d, fmt), "{fmt}");
        assert!(qemu_compare(&src, "raw", &back, "raw"), "{fmt} back");
    }
}

#[test]
fn encrypted_qcow2_target_falls_back() {
    let dir = tempdir();
    let src = qemu_raw(dir.path(), "src.raw", ODD, WRITES);
    let obj = "secret,id=sec0,data=offload";
    let dst = dir.path().join("enc.qcow2");
    diskimg_ok(&[
        "convert",
        "-C",
        "--object",
        obj,
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        s(&src),
        s(&dst),
    ]);
    let io = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        s(&dst)
    );
    let r = format!("driver=raw,file.filename={}", s(&src));
    for args in [
        vec!["compare", "--object", obj, "--image-opts", &io, &r],
        vec!["check", "--object", obj, "--image-opts", &io],
    ] {
        let o = Command::new("qemu-img").args(&args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {o:?}");
    }
    // An encrypted source has no plain host offsets: decrypted through reads.
    let back = dir.path().join("back.raw");
    diskimg_ok(&[
        "convert",
        "-C",
        "--object",
        obj,
        "--image-opts",
        &io,
        s(&back),
    ]);
    assert!(qemu_compare(&src, "raw", &back, "raw"));
    // The plaintext pattern is nowhere in the file.
    let file = std::fs::read(&dst).unwrap();
    assert!(!file.windows(4096).any(|w| w.iter().all(|&b| b == 0x22)));
}

#[test]
fn option_errors_match_qemu() {
    let dir = tempdir();
    let src = qemu_raw(dir.path(), "src.raw", "1M", &["write -P 1 0 4k"]);
    let dst = dir.path().join("dst.qcow2");
    let cases: [(&[&str], &str); 3] = [
        (&["-c"], "Cannot enable copy offloading when -c is used"),
        (
            &["-S", "0"],
            "Cannot enable copy offloading when -S is used",
        ),
        (
            &["-S", "4k"],
            "Cannot enable copy offloading when -S is used",
        ),
    ];
    for (extra, msg) in cases {
        for long in [false, true] {
            let mut a = vec![
                "convert",
                if long {
                    "--copy-range-offloading"
                } else {
                    "-C"
                },
                "-O",
                "qcow2",
            ];
            a.extend(extra);
            a.extend([s(&src), s(&dst)]);
            let o = diskimg(&a);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(code(&o), 1, "{a:?}: {err}");
            assert!(err.contains(msg), "{a:?}: {err}");
            assert!(!dst.exists(), "{a:?} created the target");
            let mut q = a.clone();
            q.remove(0);
            let qo = Command::new("qemu-img")
                .arg("convert")
                .args(&q[..])
                .output()
                .unwrap();
            assert_eq!(qo.status.code(), Some(1));
            assert!(String::from_utf8_lossy(&qo.stderr).contains(msg));
        }
    }
}

/// The data really goes through copy_file_range, one call per data extent at the same
/// offsets for raw to raw (as qemu-img). strace is required (`.ci/run` installs it); a
/// missing strace fails the test.
#[test]
fn copy_file_range_is_used() {
    let v = crate::serve::tool("strace", &["-V"]);
    assert!(v.status.success(), "strace -V failed: {v:?}");
    let dir = tempdir();
    let src = qemu_raw(
        dir.path(),
        "src.raw",
        "8M",
        &["write -P 1 0 1m", "write -P 2 4m 512k"],
    );
    let dst = dir.path().join("dst.raw");
    let o = Command::new("strace")
        .args(["-f", "-e", "trace=copy_file_range"])
        .arg(env!("CARGO_BIN_EXE_diskimg"))
        .args(["convert", "-C", "-m", "1", "-O", "raw", s(&src), s(&dst)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let log = String::from_utf8_lossy(&o.stderr);
    let calls: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("copy_file_range(") && !l.contains("unfinished"))
        .collect();
    assert_eq!(calls.len(), 2, "{log}");
    // copy_file_range(IN, [OFF_IN], OUT, [OFF_OUT], LEN, 0) = LEN
    let offsets =
        |l: &str| -> (usize, usize) { (l.matches("[0]").count(), l.matches("[4194304]").count()) };
    assert_eq!(offsets(calls[0]), (2, 0), "{log}");
    assert!(calls[0].contains("1048576, 0) = 1048576"), "{log}");
    assert_eq!(offsets(calls[1]), (0, 2), "{log}");
    assert!(calls[1].contains("524288, 0) = 524288"), "{log}");
    assert!(qemu_compare(&src, "raw", &dst, "raw"));
}
