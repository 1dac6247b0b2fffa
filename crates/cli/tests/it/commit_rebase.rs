//! `commit` and `rebase` side by side with qemu-img on identical chains: the same
//! content (compare against the expected raw), clean checks, the same maps and headers.

use std::path::{Path, PathBuf};

use diskimg_testutil::{
    assert_qemu_check_clean, qemu_compare, qemu_create_overlay, qemu_img, qemu_img_ok, qemu_io,
    qemu_map_json, tempdir,
};

use crate::{code, diskimg, diskimg_ok, s};

/// base (4M, pattern 1 over all but a hole) <- mid (writes) <- top (6M, writes, zeroes).
/// Returns the paths of base, mid and top inside `sub`.
fn chain(dir: &Path, sub: &str) -> (PathBuf, PathBuf, PathBuf) {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    let (base, mid, top) = (
        d.join("base.qcow2"),
        d.join("mid.qcow2"),
        d.join("top.qcow2"),
    );
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 1 0 3M", "write -P 9 3584k 512k"],
    );
    qemu_create_overlay(s(&mid), "qcow2", "base.qcow2", "qcow2", Some("4M"));
    qemu_io(&mid, "qcow2", &["write -P 2 1M 256k", "write -z 2M 128k"]);
    qemu_create_overlay(s(&top), "qcow2", "mid.qcow2", "qcow2", Some("6M"));
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 3 512k 64k",
            "write -z 1088k 64k",
            "write -P 4 5M 100k",
            "write -P 5 100 1000",
        ],
    );
    (base, mid, top)
}

fn raw_of(p: &Path, out: &Path) -> PathBuf {
    qemu_img_ok(&["convert", "-O", "raw", s(p), s(out)]);
    out.to_path_buf()
}

/// `qemu-img info` without host-dependent parts (directory, disk usage) and the file
/// length (qemu truncates an emptied top image, we keep its clusters allocated).
fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn info_of(p: &Path) -> String {
    let name = p.file_name().unwrap().to_str().unwrap();
    qemu_img_ok(&["info", "-U", s(p)])
        .replace(s(p), name)
        .replace(s(p.parent().unwrap()), "DIR")
        .lines()
        .filter(|l| !l.contains("disk size") && !l.contains("file length"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn commit_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    for (args, into_mid) in [
        (vec![], true),
        (vec!["-d"], true),
        (vec!["-b", "BASE"], false),
    ] {
        let (qb, qm, qt) = chain(d, "q");
        let (db, dm, dt) = chain(d, "d");
        let expected = raw_of(&qt, &d.join("expected.raw"));
        let run = |tool: &dyn Fn(&[&str]) -> std::process::Output, base: &Path, top: &Path| {
            let mut a = vec!["commit"];
            for x in &args {
                a.push(if *x == "BASE" { s(base) } else { x });
            }
            a.push(s(top));
            tool(&a)
        };
        let q = run(&|a| qemu_img(a), &qb, &qt);
        let o = run(&|a| diskimg(a), &db, &dt);
        assert_eq!(code(&o), code(&q), "{args:?}");
        assert_eq!(o.stdout, q.stdout, "{args:?}");
        assert_eq!(String::from_utf8_lossy(&o.stdout), "Image committed.\n");
        let target = if into_mid { (&qm, &dm) } else { (&qb, &db) };
        for (p, name) in [(&qb, "base"), (&qm, "mid"), (&qt, "top")] {
            let ours = d.join("d").join(p.file_name().unwrap());
            assert_qemu_check_clean(&ours, "qcow2");
            // The top still reads the same; every image's content is qemu's.
            let (qr, dr) = (d.join("q.raw"), d.join("d.raw"));
            raw_of(p, &qr);
            raw_of(&ours, &dr);
            assert_eq!(
                std::fs::read(&qr).unwrap(),
                std::fs::read(&dr).unwrap(),
                "{args:?} {name}"
            );
            assert_eq!(info_of(p), info_of(&ours), "{args:?} {name}");
        }
        assert!(qemu_compare(&dt, "qcow2", &expected, "raw"));
        assert!(qemu_compare(target.1, "qcow2", &expected, "raw") || !into_mid);
        // The top image is emptied (all unallocated) exactly when qemu empties it.
        let q_alloc = qemu_map_json(&qt, "qcow2")
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["depth"] == 0);
        let d_alloc = qemu_map_json(&dt, "qcow2")
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["depth"] == 0);
        assert_eq!(q_alloc, d_alloc, "{args:?}");
        // An emptied top gives its space back (qemu rebuilds it to its header, tables
        // and refcounts; we cut the freed clusters off the end).
        let (qlen, dlen) = (len(&qt), len(&dt));
        if !q_alloc {
            assert!(dlen <= qlen + 2 * 65536, "{args:?}: {dlen} vs qemu {qlen}");
        }
        let _ = target.0;
        std::fs::remove_dir_all(d.join("q")).unwrap();
        std::fs::remove_dir_all(d.join("d")).unwrap();
    }
}

#[test]
fn commit_vmdk_on_vmdk_like_qemu() {
    // Formats without make_empty commit and keep the top's data, as qemu.
    let dir = tempdir();
    let mut maps = Vec::new();
    for sub in ["q", "d"] {
        let d = dir.path().join(sub);
        std::fs::create_dir_all(&d).unwrap();
        let (b, t) = (d.join("b.vmdk"), d.join("t.vmdk"));
        qemu_img_ok(&["create", "-q", "-f", "vmdk", s(&b), "4M"]);
        qemu_io(&b, "vmdk", &["write -P 1 1M 1M"]);
        crate::qemu_overlay("vmdk", "b.vmdk", "vmdk", s(&t));
        qemu_io(&t, "vmdk", &["write -P 3 0 64k", "write -P 4 1536k 64k"]);
        let expected = raw_of(&t, &d.join("e.raw"));
        let a = ["commit", s(&t)];
        let o = if sub == "q" {
            qemu_img(&a)
        } else {
            diskimg(&a)
        };
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "Image committed.\n");
        assert!(qemu_compare(&b, "vmdk", &expected, "raw"));
        maps.push(
            qemu_map_json(&t, "vmdk")
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["depth"].clone())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(maps[0], maps[1]);
}

#[test]
fn commit_errors_like_qemu() {
    let dir = tempdir();
    let p = dir.path().join("alone.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "1M"]);
    let (_, _, top) = chain(dir.path(), "c");
    for a in [
        vec!["commit", s(&p)],
        vec!["commit", "-b", "/nonexistent.qcow2", s(&top)],
    ] {
        let (o, q) = (diskimg(&a), qemu_img(&a));
        assert_eq!(code(&o), code(&q), "{a:?}");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).replace("diskimg:", "qemu-img:"),
            String::from_utf8_lossy(&q.stderr),
            "{a:?}"
        );
    }
}

#[test]
fn rebase_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    for args in [
        vec!["-b", "other.qcow2", "-F", "qcow2"],
        vec!["-b", "base.qcow2", "-F", "qcow2"],
        vec!["-b", ""],
        vec!["-u", "-b", "other.qcow2", "-F", "qcow2"],
        vec!["-u", "-b", ""],
        vec!["-b", "other.qcow2"],
        vec!["-c", "-b", "", "-F", "qcow2"],
    ] {
        let mut outs = Vec::new();
        for (sub, tool) in [("q", "qemu"), ("d", "ours")] {
            let (_, _, top) = chain(d, sub);
            let other = d.join(sub).join("other.qcow2");
            qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&other), "2M"]);
            qemu_io(&other, "qcow2", &["write -P 7 0 1M"]);
            let before = raw_of(&top, &d.join(format!("{sub}-before.raw")));
            let mut a = vec!["rebase"];
            a.extend(&args);
            a.push(s(&top));
            let o = if tool == "qemu" {
                qemu_img(&a)
            } else {
                diskimg(&a)
            };
            let after = d.join(format!("{sub}-after.raw"));
            raw_of(&top, &after);
            assert_qemu_check_clean(&top, "qcow2");
            let same_content = std::fs::read(&before).unwrap() == std::fs::read(&after).unwrap();
            let compressed = qemu_map_json(&top, "qcow2")
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["compressed"] == true)
                .map(|e| (e["start"].clone(), e["length"].clone()))
                .collect::<Vec<_>>();
            outs.push((
                compressed,
                code(&o),
                String::from_utf8_lossy(&o.stderr).replace("diskimg:", "qemu-img:"),
                info_of(&top),
                std::fs::read(&after).unwrap(),
                same_content,
            ));
        }
        assert_eq!(outs[0].0, outs[1].0, "{args:?}: compressed ranges");
        assert_eq!(outs[0].1, outs[1].1, "{args:?}");
        assert_eq!(outs[0].2, outs[1].2, "{args:?}");
        assert_eq!(outs[0].3, outs[1].3, "{args:?}");
        assert!(
            outs[0].4 == outs[1].4,
            "{args:?}: content differs from qemu's"
        );
        if !args.contains(&"-u") {
            assert!(outs[1].5, "{args:?}: safe rebase changed the guest view");
        }
        std::fs::remove_dir_all(d.join("q")).unwrap();
        std::fs::remove_dir_all(d.join("d")).unwrap();
    }
    // Formats that cannot store a backing file refuse as qemu does.
    let r = d.join("r.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&r), "1M"]);
    let a = [
        "rebase",
        "-f",
        "raw",
        "-u",
        "-b",
        "x.qcow2",
        "-F",
        "qcow2",
        s(&r),
    ];
    let (o, q) = (diskimg(&a), qemu_img(&a));
    assert_eq!(code(&o), code(&q));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).replace("diskimg:", "qemu-img:"),
        String::from_utf8_lossy(&q.stderr)
    );
}

#[test]
fn commit_of_a_dirty_lazy_refcounts_image() {
    // iotest 039: a dirty lazy-refcounts overlay is repaired at open and committed.
    let dir = tempdir();
    for sub in ["q", "d"] {
        let d = dir.path().join(sub);
        std::fs::create_dir_all(&d).unwrap();
        let (b, t) = (d.join("b.qcow2"), d.join("t.qcow2"));
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&b), "4M"]);
        qemu_io(&b, "qcow2", &["write -P 1 0 4M"]);
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            s(&t),
        ]);
        let o = crate::qemu_io_raw(&[
            "-f",
            "qcow2",
            "-c",
            "write -P 2 64k 128k",
            "-c",
            "abort",
            s(&t),
        ]);
        assert!(!o.status.success());
        assert_eq!(std::fs::read(&t).unwrap()[79] & 1, 1);
        let expected = raw_of(&t, &d.join("e.raw"));
        let a = ["commit", s(&t)];
        let o = if sub == "q" {
            qemu_img(&a)
        } else {
            diskimg(&a)
        };
        assert_eq!(code(&o), 0, "{sub}: {}", String::from_utf8_lossy(&o.stderr));
        assert_qemu_check_clean(&t, "qcow2");
        assert_qemu_check_clean(&b, "qcow2");
        assert!(qemu_compare(&b, "qcow2", &expected, "raw"), "{sub}");
        assert!(qemu_compare(&t, "qcow2", &expected, "raw"), "{sub}");
        assert_eq!(
            std::fs::read(&t).unwrap()[79] & 1,
            0,
            "{sub}: dirty bit cleared"
        );
    }
}

/// Commit of a differencing VHDX (qemu cannot open those): the parent gets the child's
/// data (qemu-io reads it, qemu-img check is clean) and a new DataWriteGuid; the child,
/// kept (vhdx cannot be emptied), is relinked to it and still opens with the same view.
#[test]
fn commit_vhdx_relinks_the_child() {
    let dir = tempdir();
    let d = dir.path();
    let (base, top) = (d.join("base.vhdx"), d.join("top.vhdx"));
    qemu_img_ok(&["create", "-q", "-f", "vhdx", s(&base), "8M"]);
    qemu_io(&base, "vhdx", &["write -P 1 0 2M"]);
    diskimg_ok(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-b",
        "base.vhdx",
        "-F",
        "vhdx",
        s(&top),
    ]);
    diskimg_ok(&["io", "-c", "write -P 2 1M 2M", s(&top)]);
    let before = d.join("before.raw");
    diskimg_ok(&["convert", "-O", "raw", s(&top), s(&before)]);
    assert_eq!(diskimg_ok(&["commit", s(&top)]), "Image committed.\n");
    assert_qemu_check_clean(&base, "vhdx");
    qemu_io(
        &base,
        "vhdx",
        &["read -P 1 0 1M", "read -P 2 1M 2M", "read -P 0 3M 5M"],
    );
    let after = d.join("after.raw");
    diskimg_ok(&["convert", "-O", "raw", s(&top), s(&after)]);
    assert_eq!(
        std::fs::read(&after).unwrap(),
        std::fs::read(&before).unwrap()
    );
    assert_eq!(code(&diskimg(&["check", s(&top)])), 0);
    // A later change of the parent is refused again.
    qemu_io(&base, "vhdx", &["write -P 3 6M 4k"]);
    let o = diskimg(&["convert", "-O", "raw", s(&top), s(&after)]);
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("parent_linkage"));
}
