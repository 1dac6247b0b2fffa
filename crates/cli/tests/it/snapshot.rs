//! `snapshot -l | -c | -a | -d` side by side with qemu-img, both ways.

use diskimg_testutil::{
    assert_qemu_check_clean, qemu_img, qemu_img_ok, qemu_io, qemu_read_raw, tempdir,
};

use crate::{code, diskimg, diskimg_ok, s};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .replace("qemu-img:", "TOOL:")
        .replace("diskimg:", "TOOL:")
}

#[test]
fn snapshots_interoperate_with_qemu() {
    let dir = tempdir();
    let p = dir.path().join("s.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "4M"]);
    qemu_io(&p, "qcow2", &["write -P 1 0 256k"]);
    qemu_img_ok(&["snapshot", "-c", "q1", s(&p)]);
    let at_q1 = qemu_read_raw(&p, "qcow2");
    // Our list of qemu's snapshot is qemu's, byte for byte; so is `info`.
    assert_eq!(
        diskimg_ok(&["snapshot", "-l", s(&p)]),
        qemu_img_ok(&["snapshot", "-l", s(&p)])
    );
    qemu_io(&p, "qcow2", &["write -P 2 64k 64k"]);
    diskimg_ok(&["snapshot", "-c", "d2", s(&p)]);
    let at_d2 = qemu_read_raw(&p, "qcow2");
    assert_qemu_check_clean(&p, "qcow2");
    assert_eq!(
        diskimg_ok(&["snapshot", "-l", s(&p)]),
        qemu_img_ok(&["snapshot", "-l", s(&p)])
    );
    assert_eq!(diskimg_ok(&["info", s(&p)]), qemu_img_ok(&["info", s(&p)]));
    qemu_io(&p, "qcow2", &["write -P 3 0 1M"]);
    // We apply qemu's snapshot; qemu applies ours.
    diskimg_ok(&["snapshot", "-a", "q1", s(&p)]);
    assert_qemu_check_clean(&p, "qcow2");
    assert_eq!(qemu_read_raw(&p, "qcow2"), at_q1);
    qemu_img_ok(&["snapshot", "-a", "d2", s(&p)]);
    assert_eq!(qemu_read_raw(&p, "qcow2"), at_d2);
    diskimg_ok(&["snapshot", "-a", "2", s(&p)]);
    assert_eq!(qemu_read_raw(&p, "qcow2"), at_d2);
    // Deleting: ours of qemu's snapshot, qemu's of ours.
    diskimg_ok(&["snapshot", "-d", "q1", s(&p)]);
    assert_qemu_check_clean(&p, "qcow2");
    let l = qemu_img_ok(&["snapshot", "-l", s(&p)]);
    assert!(!l.contains("q1") && l.contains("d2"), "{l}");
    qemu_img_ok(&["snapshot", "-d", "d2", s(&p)]);
    assert_eq!(diskimg_ok(&["snapshot", "-l", s(&p)]), "");
    assert_qemu_check_clean(&p, "qcow2");
    assert_eq!(qemu_read_raw(&p, "qcow2"), at_d2);
    // qemu allows two snapshots with one name; so do we.
    diskimg_ok(&["snapshot", "-c", "same", s(&p)]);
    diskimg_ok(&["snapshot", "-c", "same", s(&p)]);
    assert_eq!(
        diskimg_ok(&["snapshot", "-l", s(&p)]),
        qemu_img_ok(&["snapshot", "-l", s(&p)])
    );
    assert_qemu_check_clean(&p, "qcow2");
}

#[test]
fn snapshot_errors_like_qemu() {
    let dir = tempdir();
    let q = dir.path().join("e.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&q), "1M"]);
    let r = dir.path().join("e.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&r), "1M"]);
    for (fmt, file) in [("qcow2", &q), ("raw", &r)] {
        for args in [
            vec!["-d", "nope"],
            vec!["-a", "nope"],
            vec!["-c", "s"],
            vec!["-l"],
        ] {
            if fmt == "qcow2" && args[0] == "-c" {
                continue;
            }
            let mut a = vec!["snapshot", "-f", fmt];
            a.extend(&args);
            a.push(s(file));
            let (ours, theirs) = (diskimg(&a), qemu_img(&a));
            assert_eq!(code(&ours), code(&theirs), "{a:?}");
            assert_eq!(stderr(&ours), stderr(&theirs), "{a:?}");
            assert_eq!(ours.stdout, theirs.stdout, "{a:?}");
        }
    }
}

#[test]
fn one_bit_refcounts_like_qemu() {
    // iotest 112: with refcount_bits=1 an empty image can be snapshotted, one with data
    // cannot (the shared clusters would need refcount 2); the failure leaves leaks only.
    let dir = tempdir();
    for data in [false, true] {
        let mut results = Vec::new();
        for tool in ["qemu", "ours"] {
            let p = dir.path().join(format!("{tool}.qcow2"));
            qemu_img_ok(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=1",
                s(&p),
                "1M",
            ]);
            if data {
                qemu_io(&p, "qcow2", &["write -P 1 0 64k"]);
            }
            let a = ["snapshot", "-c", "s", s(&p)];
            let o = if tool == "qemu" {
                qemu_img(&a)
            } else {
                diskimg(&a)
            };
            let (check, rc) = diskimg_testutil::qemu_check_json(&p, "qcow2");
            results.push((code(&o), stderr(&o), check["corruptions"].clone(), rc));
            assert!(rc == 0 || rc == 3, "{tool} data={data}: {check}");
            if data {
                assert_eq!(qemu_read_raw(&p, "qcow2")[..65536], [1u8; 65536]);
            }
        }
        assert_eq!(results[0], results[1], "data={data}");
    }
}

/// Snapshots of another disk size: applying one resizes the disk to it, and an image
/// with snapshots can shrink (v3), all as qemu-img does.
#[test]
fn snapshots_across_disk_sizes_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let orig = d.join("orig.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&orig),
        "4M",
    ]);
    qemu_io(&orig, "qcow2", &["write -P 1 0 1M", "write -P 5 3M 1M"]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&orig)]);
    qemu_img_ok(&["resize", "-q", s(&orig), "8M"]);
    qemu_io(&orig, "qcow2", &["write -P 2 6M 1M", "write -P 3 512k 64k"]);
    qemu_img_ok(&["snapshot", "-c", "s2", s(&orig)]);
    qemu_io(&orig, "qcow2", &["write -P 4 7M 4k"]);
    let (q, o) = (d.join("q.qcow2"), d.join("d.qcow2"));
    let same = |what: &str| {
        assert_qemu_check_clean(&o, "qcow2");
        assert!(
            qemu_read_raw(&o, "qcow2") == qemu_read_raw(&q, "qcow2"),
            "{what}"
        );
        for sn in ["s1", "s2"] {
            let (qr, dr) = (d.join("q.raw"), d.join("d.raw"));
            qemu_img_ok(&["convert", "-l", sn, "-O", "raw", s(&q), s(&qr)]);
            qemu_img_ok(&["convert", "-l", sn, "-O", "raw", s(&o), s(&dr)]);
            assert!(
                std::fs::read(&qr).unwrap() == std::fs::read(&dr).unwrap(),
                "{what} {sn}"
            );
        }
    };
    for steps in [
        vec![vec!["snapshot", "-a", "s1"], vec!["snapshot", "-a", "s2"]],
        vec![
            vec!["resize", "-q", "--shrink"],
            vec!["snapshot", "-a", "s2"],
        ],
        vec![
            vec!["snapshot", "-a", "s1"],
            vec!["resize", "-q", "--shrink"],
        ],
    ] {
        std::fs::copy(&orig, &q).unwrap();
        std::fs::copy(&orig, &o).unwrap();
        for step in steps {
            let mut args: Vec<&str> = step.clone();
            let size = args.first() == Some(&"resize");
            let run = |tool: &dyn Fn(&[&str]) -> std::process::Output, f: &str| {
                let mut a = args.clone();
                a.push(f);
                if size {
                    a.push("2M");
                }
                tool(&a)
            };
            let (qo, oo) = (run(&|a| qemu_img(a), s(&q)), run(&|a| diskimg(a), s(&o)));
            assert_eq!(
                (code(&oo), stderr(&oo)),
                (code(&qo), stderr(&qo)),
                "{step:?}"
            );
            args.clear();
            same(&format!("{step:?}"));
        }
        // Still writable afterwards.
        qemu_io(&o, "qcow2", &["write -P 9 1M 8k"]);
        assert_qemu_check_clean(&o, "qcow2");
    }
}
