//! `bitmap --add/--remove/--clear/--enable/--disable` side by side with qemu-img.

use diskimg_testutil::{
    assert_qemu_check_clean, qemu_img, qemu_img_ok, qemu_info_json, qemu_io, tempdir,
};

use crate::{code, diskimg, s};

fn bitmaps(p: &std::path::Path) -> serde_json::Value {
    qemu_info_json(p, "qcow2")["format-specific"]["data"]["bitmaps"].clone()
}

#[test]
fn bitmap_ops_like_qemu() {
    let dir = tempdir();
    let (q, d) = (dir.path().join("q.qcow2"), dir.path().join("d.qcow2"));
    for p in [&q, &d] {
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            s(p),
            "64M",
        ]);
        qemu_io(p, "qcow2", &["write -P 1 0 1M"]);
    }
    let steps: &[&[&str]] = &[
        &["--add", "b0"],
        &["--add", "--disable", "-g", "128k", "b1"],
        &["--add", "-g", "512", "b2"],
        &["--add", "b0"],
        &["--add", "-g", "1000", "b3"],
        &["--enable", "b1"],
        &["--disable", "b0"],
        &["--remove", "b2"],
        &["--remove", "nope"],
        &["--clear", "b1"],
        &["b0"],
    ];
    for (i, step) in steps.iter().enumerate() {
        let run = |tool: &dyn Fn(&[&str]) -> std::process::Output, p: &std::path::Path| {
            let mut a = vec!["bitmap"];
            a.extend(step.iter().take(step.len().saturating_sub(1)));
            a.push(s(p));
            a.extend(step.last());
            tool(&a)
        };
        let (qo, o) = (run(&|a| qemu_img(a), &q), run(&|a| diskimg(a), &d));
        assert_same_outcome(&o, &qo, &format!("{step:?}"));
        assert_qemu_check_clean(&d, "qcow2");
        assert_eq!(bitmaps(&d), bitmaps(&q), "{step:?}");
        assert_eq!(code(&diskimg(&["check", s(&d)])), 0, "{step:?}");
        if i == 6 {
            // qemu writes through our enabled bitmap: bits get data clusters.
            qemu_io(&d, "qcow2", &["write -P 2 0 8M"]);
            qemu_io(&q, "qcow2", &["write -P 2 0 8M"]);
            assert_qemu_check_clean(&d, "qcow2");
        }
    }
    // Our info shows the bitmaps as qemu's does.
    let ours: serde_json::Value =
        serde_json::from_str(&crate::diskimg_ok(&["info", "--output=json", s(&d)])).unwrap();
    assert_eq!(ours["format-specific"]["data"]["bitmaps"], bitmaps(&d));
    // qemu edits ours; we edit qemu's.
    qemu_img_ok(&["bitmap", "--remove", s(&d), "b1"]);
    assert_eq!(code(&diskimg(&["bitmap", "--remove", s(&q), "b1"])), 0);
    assert_eq!(code(&diskimg(&["bitmap", "--remove", s(&q), "b0"])), 0);
    for p in [&q, &d] {
        assert_qemu_check_clean(p, "qcow2");
    }
    assert_eq!(bitmaps(&q), serde_json::Value::Null);
    // v2 images and other formats refuse, as qemu.
    let v2 = dir.path().join("v2.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&v2),
        "1M",
    ]);
    let a = ["bitmap", "--add", s(&v2), "x"];
    let (o, qo) = (diskimg(&a), qemu_img(&a));
    assert_eq!(code(&o), code(&qo));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).replace("diskimg:", "qemu-img:"),
        String::from_utf8_lossy(&qo.stderr)
            .replace("Can't make bitmap 'x' persistent in '#block", "")
            .split_once("': ")
            .map(|(_, r)| format!("qemu-img: Operation add on bitmap x failed: {r}"))
            .unwrap()
    );
}

fn bits(p: &std::path::Path, name: &str) -> (u64, Vec<u8>) {
    let s = std::sync::Arc::new(diskimg::blockio::FileStorage::open(p, true).unwrap());
    diskimg::qcow2::read_bitmap(s, name).unwrap()
}

#[test]
fn bitmap_merge_like_qemu() {
    let dir = tempdir();
    let (q, d) = (dir.path().join("q.qcow2"), dir.path().join("d.qcow2"));
    let src = dir.path().join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&src), "16M"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "64k", s(&src), "track"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "4k", s(&src), "fine"]);
    qemu_img_ok(&[
        "bitmap",
        "--add",
        "--disable",
        "-g",
        "1M",
        s(&src),
        "coarse",
    ]);
    // qemu-io writes set bits in the enabled bitmaps.
    qemu_io(
        &src,
        "qcow2",
        &["write 0 4k", "write 100k 300k", "write 15M 1M"],
    );
    assert!(bits(&src, "track").1.iter().any(|&b| b != 0));
    qemu_img_ok(&["bitmap", "--disable", s(&src), "fine"]);
    qemu_io(&src, "qcow2", &["write 8M 64k"]);
    for (target, source) in [
        ("coarse", "track"),
        ("fine", "track"),
        ("track", "coarse"),
        ("coarse", "fine"),
    ] {
        std::fs::copy(&src, &q).unwrap();
        std::fs::copy(&src, &d).unwrap();
        qemu_img_ok(&["bitmap", "--merge", source, s(&q), target]);
        let o = diskimg(&["bitmap", "--merge", source, s(&d), target]);
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        assert_qemu_check_clean(&d, "qcow2");
        for name in ["track", "fine", "coarse"] {
            assert_eq!(
                bits(&d, name),
                bits(&q, name),
                "{source} -> {target}: {name}"
            );
        }
        assert_eq!(bitmaps(&d), bitmaps(&q));
    }
    // From another image (-b/-F).
    let other = dir.path().join("other.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&other), "16M"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "16k", s(&other), "o"]);
    qemu_io(&other, "qcow2", &["write 3M 100k", "write 9M 1k"]);
    std::fs::copy(&src, &q).unwrap();
    std::fs::copy(&src, &d).unwrap();
    let args = |p: &std::path::Path| {
        vec![
            "bitmap".to_string(),
            "--merge".into(),
            "o".into(),
            "-b".into(),
            s(&other).into(),
            "-F".into(),
            "qcow2".into(),
            s(p).into(),
            "coarse".into(),
        ]
    };
    let qa = args(&q);
    qemu_img_ok(&qa.iter().map(String::as_str).collect::<Vec<_>>());
    let da = args(&d);
    let o = diskimg(&da.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_qemu_check_clean(&d, "qcow2");
    assert_eq!(bits(&d, "coarse"), bits(&q, "coarse"));
    assert_ne!(bits(&d, "coarse"), bits(&src, "coarse"));
    let a = ["bitmap", "--merge", "nope", s(&d), "track"];
    let (o, qo) = (diskimg(&a), qemu_img(&a));
    assert_eq!(code(&o), code(&qo));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).replace("diskimg:", "qemu-img:"),
        String::from_utf8_lossy(&qo.stderr)
    );
}

/// Granularity and bits of every bitmap of a qcow2 file, read with the library.
fn bitmap_bits(path: &std::path::Path, names: &[&str]) -> Vec<(u64, Vec<u8>)> {
    names
        .iter()
        .map(|n| {
            let st = std::sync::Arc::new(diskimg::blockio::FileStorage::open(path, true).unwrap());
            diskimg::qcow2::read_bitmap(st, n).unwrap()
        })
        .collect()
}

#[test]
fn convert_bitmaps_copies_them_like_qemu() {
    let dir = tempdir();
    let src = dir.path().join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&src), "16M"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "128k", s(&src), "b0"]);
    qemu_img_ok(&["bitmap", "--add", s(&src), "b1"]);
    crate::qemu_io_raw(&[
        "-c",
        "write -P 1 1M 300k",
        "-c",
        "write -P 2 9M 64k",
        s(&src),
    ]);
    qemu_img_ok(&["bitmap", "--disable", s(&src), "b1"]);
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    let o = diskimg(&["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&ours)]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    qemu_img_ok(&["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&theirs)]);
    let list = |p: &std::path::Path| {
        let v: serde_json::Value =
            serde_json::from_str(&qemu_img_ok(&["info", "--output=json", s(p)])).unwrap();
        v["format-specific"]["data"]["bitmaps"].clone()
    };
    assert_eq!(list(&ours), list(&theirs));
    let b = bitmap_bits(&ours, &["b0", "b1"]);
    assert_eq!(b, bitmap_bits(&theirs, &["b0", "b1"]));
    assert!(
        b[0].1.iter().any(|&x| x != 0),
        "the copied bitmap has dirty bits"
    );
    assert_qemu_check_clean(&ours, "qcow2");
    // Not from raw.
    let raw = dir.path().join("r.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let o = diskimg(&[
        "convert",
        "--bitmaps",
        "-O",
        "qcow2",
        s(&raw),
        s(&dir.path().join("x")),
    ]);
    assert_eq!(code(&o), 1);
}

/// `(name, flags)` of every bitmap of `p` as `qemu-img info` shows them.
fn flags(p: &std::path::Path) -> Vec<(String, serde_json::Value)> {
    bitmaps(p)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].as_str().unwrap().to_string(), b["flags"].clone()))
        .collect()
}

/// A 16 MiB qcow2 with enabled bitmaps of 64 KiB and 4 KiB granularity and a
/// disabled one, over `backing` if given.
fn tracked_image(p: &std::path::Path, backing: Option<&std::path::Path>) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        a.extend(["-b", s(b), "-F", "qcow2"]);
    }
    a.extend([s(p), "16M"]);
    qemu_img_ok(&a);
    qemu_img_ok(&["bitmap", "--add", s(p), "en"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "4k", s(p), "fine"]);
    qemu_img_ok(&["bitmap", "--add", "--disable", s(p), "dis"]);
}

/// Ours and qemu's copy agree on flags (none in use) and bits; both check clean.
fn assert_same_bitmaps(d: &std::path::Path, q: &std::path::Path, what: &str) {
    for p in [d, q] {
        assert_qemu_check_clean(p, "qcow2");
    }
    assert_eq!(flags(d), flags(q), "{what}");
    assert!(!bitmaps(d).to_string().contains("in-use"), "{what}");
    for n in ["en", "fine", "dis"] {
        assert_eq!(bits(d, n), bits(q, n), "{what}: bitmap {n}");
    }
    assert!(bits(d, "en").1.iter().any(|&b| b != 0), "{what}");
}

#[test]
fn guest_writes_through_the_cli_update_bitmaps_like_qemu() {
    let dir = tempdir();
    let (q, d) = (dir.path().join("q.qcow2"), dir.path().join("d.qcow2"));
    // io
    for p in [&q, &d] {
        tracked_image(p, None);
    }
    let cmds = [
        "write -P 1 0 100k",
        "write -z 1M 64k",
        "discard 2M 1M",
        "write 5M 1",
        "flush",
        "write -P 2 15M 512",
    ];
    let mut a = vec!["io", "-f", "qcow2"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(s(&d));
    crate::diskimg_ok(&a);
    qemu_io(&q, "qcow2", &cmds);
    assert_same_bitmaps(&d, &q, "io");

    // convert -n into an image with bitmaps.
    let src = crate::qemu_raw(
        dir.path(),
        "src.raw",
        "16M",
        &["write -P 3 64k 64k", "write -P 4 8M 3M"],
    );
    for p in [&q, &d] {
        std::fs::remove_file(p).unwrap();
        tracked_image(p, None);
    }
    let conv = |p: &std::path::Path| -> Vec<String> {
        ["convert", "-n", "-f", "raw", "-O", "qcow2", s(&src), s(p)]
            .map(String::from)
            .to_vec()
    };
    let a = conv(&d);
    crate::diskimg_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let a = conv(&q);
    qemu_img_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_same_bitmaps(&d, &q, "convert -n");

    // commit into a base with bitmaps.
    let (qb, db) = (dir.path().join("qb.qcow2"), dir.path().join("db.qcow2"));
    let (qt, dt) = (dir.path().join("qt.qcow2"), dir.path().join("dt.qcow2"));
    for (b, t) in [(&qb, &qt), (&db, &dt)] {
        tracked_image(b, None);
        crate::qemu_overlay("qcow2", s(b), "qcow2", s(t));
        qemu_io(t, "qcow2", &["write -P 5 4M 200k", "write -z 9M 64k"]);
    }
    crate::diskimg_ok(&["commit", s(&dt)]);
    qemu_img_ok(&["commit", "-q", s(&qt)]);
    assert_same_bitmaps(&db, &qb, "commit");

    // rebase of an overlay with bitmaps onto another backing file.
    let (qo, dov) = (dir.path().join("qo.qcow2"), dir.path().join("do.qcow2"));
    let other = dir.path().join("other.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&other), "16M"]);
    qemu_io(&other, "qcow2", &["write -P 6 2M 1M"]);
    for p in [&qo, &dov] {
        tracked_image(p, Some(&qb));
    }
    crate::diskimg_ok(&["rebase", "-b", s(&other), "-F", "qcow2", s(&dov)]);
    qemu_img_ok(&["rebase", "-q", "-b", s(&other), "-F", "qcow2", s(&qo)]);
    assert_same_bitmaps(&dov, &qo, "rebase");
}

/// Operations run in command-line order (each may repeat), as qemu-img applies its
/// getopt list: an operation on a bitmap a later `--add` creates fails, `--add --disable`
/// leaves it disabled, `--remove --add` recreates it, the last `-g` wins, the checks of
/// `-g`/`-F`/`-b` without their operation, and what ran before a failing operation stays
/// done (also before a merge whose `-b` source bitmap is missing).
#[test]
fn bitmap_ops_in_command_line_order_like_qemu() {
    let dir = tempdir();
    let (q, d) = (dir.path().join("q.qcow2"), dir.path().join("d.qcow2"));
    let src = dir.path().join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&src), "64M"]);
    qemu_img_ok(&["bitmap", "--add", s(&src), "sb"]);
    qemu_io(&src, "qcow2", &["write -P 3 4M 1M"]);
    for p in [&q, &d] {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s(p), "64M"]);
        qemu_io(p, "qcow2", &["write -P 1 0 1M"]);
    }
    let steps: &[&[&str]] = &[
        &["--disable", "--add", "x"],
        &["--add", "--disable", "x"],
        &["--add", "--add", "x"],
        &["--remove", "--add", "x"],
        &["--add", "--remove", "--add", "y"],
        &["--clear", "--remove", "y"],
        &["--add", "--merge", "x", "z"],
        &["--merge", "x", "--merge", "x", "z"],
        &["--add", "-g", "64k", "--disable", "-g", "128k", "w"],
        &["--enable", "--disable", "--enable", "x"],
        &[
            "--disable",
            "--enable",
            "--disable",
            "--enable",
            "--disable",
            "z",
        ],
        &["-g", "64k", "--remove", "x"],
        &["-F", "qcow2", "--remove", "x"],
        &["-b", "SRC", "--remove", "x"],
        &["--add", "-b", "SRC", "--merge", "nope", "u"],
        &["--merge", "sb", "-b", "SRC", "--disable", "--add", "t"],
        &[
            "--add",
            "--merge",
            "sb",
            "-b",
            "SRC",
            "--disable",
            "--clear",
            "--merge",
            "sb",
            "t",
        ],
        // Neither bitmap exists: qemu looks the target up first.
        &["--merge", "nope", "-b", "SRC", "v"],
        // The target is gone by the time of the merge.
        &["--add", "--remove", "--merge", "nope", "-b", "SRC", "v"],
        &["--remove", "--remove", "w"],
    ];
    let bits_of = |p: &std::path::Path| {
        let names: Vec<String> = bitmaps(p)
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| b["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        names.iter().map(|n| bits(p, n)).collect::<Vec<_>>()
    };
    for step in steps {
        let run = |tool: &dyn Fn(&[&str]) -> std::process::Output, p: &std::path::Path| {
            let mut a = vec!["bitmap"];
            for x in &step[..step.len() - 1] {
                a.push(if *x == "SRC" { s(&src) } else { x });
            }
            a.push(s(p));
            a.extend(step.last());
            tool(&a)
        };
        let (qo, o) = (run(&|a| qemu_img(a), &q), run(&|a| diskimg(a), &d));
        assert_same_outcome(&o, &qo, &format!("{step:?}"));
        assert_eq!(bitmaps(&d), bitmaps(&q), "{step:?}");
        assert_eq!(bits_of(&d), bits_of(&q), "{step:?}");
        assert_qemu_check_clean(&d, "qcow2");
    }
}

/// Same exit code and (tool name aside) the same stderr as qemu-img.
fn assert_same_outcome(ours: &std::process::Output, qemu: &std::process::Output, what: &str) {
    assert_eq!(code(ours), code(qemu), "{what}");
    assert_eq!(
        String::from_utf8_lossy(&ours.stderr).replace("diskimg:", "qemu-img:"),
        String::from_utf8_lossy(&qemu.stderr),
        "{what}"
    );
}
