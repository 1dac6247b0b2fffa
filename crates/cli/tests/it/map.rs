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
    diskimg_testutil::qemu_create_overlay(s(&mid), "qcow2", "base.qcow2", "qcow2", Some("64M"));
    diskimg_testutil::qemu_create_overlay(s(&top), "qcow2", "mid.qcow2", "qcow2", Some("64M"));
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

/// Runs `prog args` in `cwd`, asserting success; returns stdout.
fn run_in(cwd: &std::path::Path, prog: &str, args: &[&str]) -> String {
    let o = std::process::Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn map_names_the_file_holding_the_data_as_qemu() {
    // Issue 15.8: multi-file VMDKs name the extent file with its host offset, a qcow2 with
    // an external data file names the data file (human output; JSON has no names but
    // must not merge runs of different files).
    let dir = tempdir();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let writes = [
        "write -P 1 0 64k",
        "write -P 2 2047M 2M",
        "write -P 3 4500M 1M",
    ];
    let mut images = Vec::new();
    for sf in [
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "monolithicFlat",
        "monolithicSparse",
    ] {
        let name = format!("{sf}.vmdk");
        let o = format!("subformat={sf}");
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &o,
            s(&sub.join(&name)),
            "5G",
        ]);
        diskimg_testutil::qemu_io(&sub.join(&name), "vmdk", &writes);
        images.push((name, "vmdk"));
    }
    // qemu opens a relative data file name against the working directory (create and
    // open alike), so that one is mapped from its own directory only; an absolute one
    // from anywhere.
    let d2 = sub.join("d2.raw");
    for (img, data) in [("q.qcow2", "d.raw"), ("q2.qcow2", s(&d2))] {
        let o = format!("data_file={data}");
        run_in(
            &sub,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &o, img, "5G"],
        );
        run_in(
            &sub,
            "qemu-io",
            &[
                "-f", "qcow2", "-c", writes[0], "-c", writes[1], "-c", writes[2], img,
            ],
        );
    }
    images.push(("q2.qcow2".to_string(), "qcow2"));
    let bin = env!("CARGO_BIN_EXE_diskimg");
    for a in [["map", "q.qcow2", ""], ["map", "--output=json", "q.qcow2"]] {
        let a: Vec<&str> = a.into_iter().filter(|x| !x.is_empty()).collect();
        assert_eq!(run_in(&sub, bin, &a), run_in(&sub, "qemu-img", &a), "{a:?}");
    }
    for (name, fmt) in &images {
        let rel = format!("sub/{name}");
        let abs = sub.join(name);
        for path in [rel.as_str(), s(&abs)] {
            let a = ["map", "-f", fmt, path];
            let ours = run_in(dir.path(), bin, &a);
            assert_eq!(ours, run_in(dir.path(), "qemu-img", &a), "{path}");
            if name.starts_with("two")
                || name.starts_with("q.")
                || name.starts_with("monolithicFlat")
            {
                assert!(
                    !ours.contains(&format!("{name}\n")),
                    "{path}: names the descriptor: {ours}"
                );
            }
            // Holes of flat extent files are data that reads as zeroes, as qemu's.
            let a = ["map", "--output=json", "-f", fmt, path];
            assert_eq!(
                run_in(dir.path(), bin, &a),
                run_in(dir.path(), "qemu-img", &a),
                "{path}"
            );
        }
    }
}
