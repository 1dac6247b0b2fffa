//! dd and resize against qemu-img.

use diskimg_testutil::{qemu_img, qemu_img_ok, qemu_read_raw, tempdir};

use crate::{code, diskimg, diskimg_ok, qemu_raw, s};

#[test]
fn dd_like_qemu() {
    let dir = tempdir();
    let src = qemu_raw(
        dir.path(),
        "src.raw",
        "3M",
        &["write -P 1 0 100k", "write -P 2 1M 1M"],
    );
    for ops in [
        vec![],
        vec!["bs=64k"],
        vec!["bs=64k", "count=20"],
        vec!["bs=64k", "count=20", "skip=16"],
        vec!["bs=1M", "count=100"],
        vec!["bs=1000", "count=7", "skip=3"],
        vec!["bs=1M", "skip=3"],
    ] {
        let ours = dir.path().join("ours.raw");
        let theirs = dir.path().join("theirs.raw");
        let if_ = format!("if={}", s(&src));
        let (of1, of2) = (format!("of={}", s(&ours)), format!("of={}", s(&theirs)));
        let mut a = vec!["dd", "-f", "raw", "-O", "raw", if_.as_str(), of1.as_str()];
        a.extend(&ops);
        diskimg_ok(&a);
        let mut q = vec!["dd", "-f", "raw", "-O", "raw", if_.as_str(), of2.as_str()];
        q.extend(&ops);
        qemu_img_ok(&q);
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "{ops:?}"
        );
    }
    // Skipping past the end: qemu prints the error but exits 0 (a bug we do not copy).
    let if_ = format!("if={}", s(&src));
    let of = format!("of={}", s(&dir.path().join("x.raw")));
    let a = [
        "dd",
        "-f",
        "raw",
        if_.as_str(),
        of.as_str(),
        "bs=1M",
        "skip=4",
    ];
    let o = diskimg(&a);
    assert_eq!(code(&o), 1);
    let q = qemu_img(&a);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).replace("diskimg", "qemu-img"),
        String::from_utf8_lossy(&q.stderr)
    );
}

#[test]
fn resize_like_qemu() {
    let dir = tempdir();
    let ours = qemu_raw(dir.path(), "ours.raw", "4M", &["write -P 3 0 4M"]);
    let theirs = qemu_raw(dir.path(), "theirs.raw", "4M", &["write -P 3 0 4M"]);
    for args in [
        vec!["resize", "-f", "raw", "+1M"],
        vec!["resize", "-f", "raw", "--shrink", "-2M"],
        vec!["resize", "-f", "raw", "-1M"],
        vec!["resize", "-f", "raw", "8M"],
        vec!["resize", "-f", "raw", "--preallocation=full", "9M"],
        vec!["resize", "-f", "raw", "--shrink", "1M"],
        vec!["resize", "-f", "raw", "-q", "--shrink", "-10M"],
    ] {
        let run = |file: &std::path::Path, f: &dyn Fn(&[&str]) -> std::process::Output| {
            let mut a: Vec<&str> = args[..3].to_vec();
            a.extend(&args[3..args.len() - 1]);
            a.push(s(file));
            a.push(args[args.len() - 1]);
            f(&a)
        };
        let o = run(&ours, &|a| diskimg(a));
        let q = run(&theirs, &|a| qemu_img(a));
        assert_eq!(code(&o), q.status.code().unwrap(), "{args:?}");
        assert_eq!(o.stdout, q.stdout, "{args:?}");
        // Messages too (the shrink warning only comes with a refusal).
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).replace("diskimg:", "qemu-img:"),
            String::from_utf8_lossy(&q.stderr),
            "{args:?}"
        );
        assert_eq!(
            qemu_read_raw(&ours, "raw"),
            qemu_read_raw(&theirs, "raw"),
            "{args:?}"
        );
    }
}

#[test]
fn resize_refuses_preallocation_without_growth() {
    // Issue 15.7: a shrink (or a same-size resize) with preallocation is refused before
    // anything is changed, for every format, in qemu-img's words.
    let dir = tempdir();
    for fmt in crate::FORMATS {
        let p = dir.path().join(format!("p.{fmt}"));
        qemu_img_ok(&["create", "-q", "-f", fmt, s(&p), "4M"]);
        let before = std::fs::read(&p).unwrap();
        for (pre, size) in [
            ("falloc", "2M"),
            ("full", "2M"),
            ("metadata", "2M"),
            ("full", "4M"),
        ] {
            let opt = format!("--preallocation={pre}");
            let a = ["resize", "-f", fmt, "--shrink", opt.as_str(), s(&p), size];
            let o = diskimg(&a);
            let q = qemu_img(&a);
            assert_eq!((code(&o), code(&q)), (1, 1), "{fmt} {pre} {size}");
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(
                err, "diskimg: Preallocation can only be used for growing images\n",
                "{fmt} {pre}"
            );
            assert_eq!(
                err.replace("diskimg:", "qemu-img:"),
                String::from_utf8_lossy(&q.stderr)
            );
            assert_eq!(std::fs::read(&p).unwrap(), before, "{fmt} {pre}: unchanged");
        }
    }
    // Without --shrink, the preallocation refusal comes first (as qemu-img).
    let p = dir.path().join("p.raw");
    let a = ["resize", "-f", "raw", "--preallocation=full", s(&p), "1M"];
    assert_eq!(
        String::from_utf8_lossy(&diskimg(&a).stderr).replace("diskimg:", "qemu-img:"),
        String::from_utf8_lossy(&qemu_img(&a).stderr)
    );
}
