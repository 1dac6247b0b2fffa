//! map output byte for byte against qemu-img on sparse raw files.

use diskimg_testutil::{qemu_img_ok, tempdir};

use crate::{diskimg_ok, qemu_raw, s};

const LAYOUTS: &[&[&str]] = &[
    &[],
    &["write -P 0xab 1M 64k"],
    &[
        "write -P 1 0 4k",
        "write -P 2 8M 1M",
        "write -z 8704k 64k",
        "write -P 3 63M 1M",
    ],
    &["write -P 9 0 64M"],
];

#[test]
fn map_json_and_human_identical_to_qemu() {
    let dir = tempdir();
    for (i, cmds) in LAYOUTS.iter().enumerate() {
        let p = qemu_raw(dir.path(), &format!("m{i}.raw"), "64M", cmds);
        for args in [
            vec!["map", "-f", "raw", "--output=json"],
            vec!["map", "--output=json"],
            vec!["map", "-f", "raw"],
            vec!["map", "-f", "raw", "--output=json", "--start-offset=1M"],
            vec!["map", "-f", "raw", "--output=json", "--max-length=8200k"],
            vec!["map", "-f", "raw", "--start-offset=4096", "--max-length=9M"],
        ] {
            let mut a = args.clone();
            a.push(s(&p));
            assert_eq!(diskimg_ok(&a), qemu_img_ok(&a), "layout {i} {args:?}");
        }
    }
}

#[test]
fn map_of_an_empty_image() {
    let dir = tempdir();
    let p = dir.path().join("z.raw");
    std::fs::write(&p, b"").unwrap();
    let a = ["map", "-f", "raw", "--output=json", s(&p)];
    assert_eq!(diskimg_ok(&a), qemu_img_ok(&a));
    let a = ["map", "-f", "raw", s(&p)];
    assert_eq!(diskimg_ok(&a), qemu_img_ok(&a));
    // Start offset at or past the end.
    let q = qemu_raw(dir.path(), "q.raw", "1M", &["write 0 4k"]);
    for start in ["--start-offset=1M", "--start-offset=3M"] {
        let a = ["map", "-f", "raw", "--output=json", start, s(&q)];
        assert_eq!(diskimg_ok(&a), qemu_img_ok(&a));
    }
}

#[test]
fn map_of_chains_with_short_backing_images_matches_qemu() {
    // base (32M, data) <- mid (64M) <- top (64M, data): depths and the range beyond the
    // short base must be reported exactly as qemu-img does.
    let dir = diskimg_testutil::tempdir();
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    diskimg_testutil::qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "32M"]);
    crate::qemu_io_raw(&["-c", "write -P 1 1M 1M", s(&base)]);
    diskimg_testutil::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&mid),
        "64M",
    ]);
    diskimg_testutil::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "64M",
    ]);
    crate::qemu_io_raw(&[
        "-c",
        "write -P 2 40M 64k",
        "-c",
        "write -z 1536k 64k",
        s(&top),
    ]);
    let ours = diskimg_ok(&["map", "--output=json", s(&top)]);
    let theirs = diskimg_testutil::qemu_img_ok(&["map", "--output=json", s(&top)]);
    assert_eq!(ours, theirs);
}
