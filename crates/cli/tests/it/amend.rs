//! `amend -o` side by side with qemu-img on identical copies (iotest 061 scenarios):
//! downgrade with zero-cluster expansion, upgrade, lazy_refcounts, size, refusals.

use std::path::{Path, PathBuf};

use diskimg_testutil::{
    assert_qemu_check_clean, qemu_img, qemu_img_ok, qemu_io, qemu_read_raw, tempdir,
};

use crate::{code, diskimg, s};

/// `qemu-img info` without host-dependent lines.
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

/// Runs `amend OPTS` with qemu-img on a copy and with diskimg on another, compares
/// exit code, messages, content and info; returns our copy.
fn both(src: &Path, dir: &Path, opts: &str) -> (PathBuf, i32) {
    both_opts(src, dir, opts, true)
}

/// [`both`], optionally without comparing stderr.
fn both_opts(src: &Path, dir: &Path, opts: &str, cmp_stderr: bool) -> (PathBuf, i32) {
    let (q, d) = (dir.join("q.qcow2"), dir.join("d.qcow2"));
    std::fs::copy(src, &q).unwrap();
    std::fs::copy(src, &d).unwrap();
    let qo = qemu_img(&["amend", "-o", opts, s(&q)]);
    let o = diskimg(&["amend", "-o", opts, s(&d)]);
    assert_eq!(
        code(&o),
        code(&qo),
        "{opts}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    if cmp_stderr {
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).replace("diskimg", "qemu-img"),
            String::from_utf8_lossy(&qo.stderr),
            "{opts}"
        );
    }
    assert_qemu_check_clean(&d, "qcow2");
    assert_eq!(
        qemu_read_raw(&d, "qcow2"),
        qemu_read_raw(&q, "qcow2"),
        "{opts}"
    );
    assert_eq!(
        info_of(&d).replace("d.qcow2", "X"),
        info_of(&q).replace("q.qcow2", "X"),
        "{opts}"
    );
    (d, code(&o))
}

fn image(dir: &Path, name: &str, create_opts: &str, backing: Option<&Path>) -> PathBuf {
    let p = dir.join(name);
    let mut a = vec!["create", "-q", "-f", "qcow2", "-o", create_opts];
    if let Some(b) = backing {
        a.extend(["-b", s(b), "-F", "qcow2"]);
    }
    a.extend([s(&p), "4M"]);
    qemu_img_ok(&a);
    qemu_io(
        &p,
        "qcow2",
        &[
            "write -P 1 0 192k",
            "write -z 64k 64k",
            "write -z -u 1M 128k",
            "write -P 2 2M 64k",
            "write -z 3M 64k",
        ],
    );
    p
}

#[test]
fn downgrade_and_upgrade_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, "qcow2", &["write -P 9 0 4M"]);
    for backing in [None, Some(base.as_path())] {
        let img = image(d, "img.qcow2", "compat=1.1", backing);
        let (ours, rc) = both(&img, d, "compat=0.10");
        assert_eq!(rc, 0);
        assert_eq!(std::fs::read(&ours).unwrap()[7], 2, "version 2 header");
        // And back up again.
        let v2 = d.join("v2.qcow2");
        std::fs::copy(&ours, &v2).unwrap();
        let (ours, rc) = both(&v2, d, "compat=1.1");
        assert_eq!(rc, 0);
        assert_eq!(std::fs::read(&ours).unwrap()[7], 3);
        both(&v2, d, "compat=1.1,lazy_refcounts=on");
    }
    // lazy refcounts on and off, resize up and down.
    let img = image(d, "img.qcow2", "compat=1.1", None);
    let (on, _) = both(&img, d, "lazy_refcounts=on");
    let on2 = d.join("on.qcow2");
    std::fs::copy(&on, &on2).unwrap();
    both(&on2, d, "lazy_refcounts=off");
    both(&on2, d, "compat=0.10,lazy_refcounts=off");
    both(&img, d, "size=8M");
    both(&img, d, "size=2M");
    both(&img, d, "size=8M,compat=0.10");
}

#[test]
fn downgrade_with_snapshots_and_upgrade_of_v2_snapshots() {
    let dir = tempdir();
    let d = dir.path();
    // iotest 061/261: a v2 image with snapshots upgraded gets v3 snapshot extra data.
    let p = d.join("v2s.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&p),
        "4M",
    ]);
    qemu_io(&p, "qcow2", &["write -P 1 0 128k"]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&p)]);
    qemu_io(&p, "qcow2", &["write -P 2 64k 128k"]);
    let (ours, _) = both(&p, d, "compat=1.1");
    assert_eq!(
        qemu_img_ok(&["snapshot", "-l", s(&ours)]).lines().count(),
        3
    );
    let s1 = d.join("s1.raw");
    qemu_img_ok(&["convert", "-l", "s1", "-O", "raw", s(&ours), s(&s1)]);
    assert_eq!(std::fs::read(&s1).unwrap()[..131072], [1u8; 131072]);
    // A v3 image with snapshots but no zero clusters downgrades.
    let p = d.join("v3s.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "4M"]);
    qemu_io(&p, "qcow2", &["write -P 1 0 128k"]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&p)]);
    qemu_io(&p, "qcow2", &["write -P 2 64k 128k"]);
    both(&p, d, "compat=0.10");
}

#[test]
fn refcount_bits_like_qemu() {
    // iotest 112: amend between refcount widths; narrowing fails when a refcount does
    // not fit (shared clusters after a snapshot, compressed clusters).
    let dir = tempdir();
    let d = dir.path();
    let img = d.join("w.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io(&img, "qcow2", &["write -P 1 0 1M", "write -c -P 2 2M 128k"]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&img)]);
    qemu_io(&img, "qcow2", &["write -P 3 512k 64k"]);
    for opts in [
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=4",
        "refcount_bits=8",
        "refcount_bits=16",
        "refcount_bits=32",
        "refcount_bits=64",
    ] {
        let (ours, rc) = both(&img, d, opts);
        if rc == 0 {
            // Same layout as qemu's: the file lengths agree too.
            let q = d.join("q.qcow2");
            assert_eq!(
                std::fs::metadata(&ours).unwrap().len(),
                std::fs::metadata(&q).unwrap().len(),
                "{opts}"
            );
            // And the image stays writable at its new width.
            qemu_io(&ours, "qcow2", &["write -P 4 3M 64k"]);
            assert_qemu_check_clean(&ours, "qcow2");
        }
    }
    // Widen, then back to 16 bits and down to compat=0.10 in one call.
    let (w8, _) = both(&img, d, "refcount_bits=8");
    let w8c = d.join("w8.qcow2");
    std::fs::rename(&w8, &w8c).unwrap();
    both(&w8c, d, "refcount_bits=16,compat=0.10");
}

#[test]
fn amend_refusals_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let img = image(d, "img.qcow2", "compat=1.1", None);
    for opts in [
        "cluster_size=4k",
        "preallocation=full",
        "foo=1",
        "backing_file=x.qcow2,backing_fmt=qcow2",
        "compat=0.10,lazy_refcounts=on",
        "compat=0.10,refcount_bits=8",
        "compat=0.9",
    ] {
        both(&img, d, opts);
    }
    for (create, opts) in [
        ("extended_l2=on", "compat=0.10"),
        ("refcount_bits=8", "compat=0.10"),
    ] {
        let p = d.join("x.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", create, s(&p), "1M"]);
        both(&p, d, opts);
    }
    // zstd: refused only with compressed clusters present.
    let p = d.join("z.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        s(&p),
        "1M",
    ]);
    both(&p, d, "compat=0.10");
    qemu_io(&p, "qcow2", &["write -c -P 1 0 64k"]);
    both(&p, d, "compat=0.10");
    // Other formats and missing options.
    let r = d.join("r.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&r), "1M"]);
    for a in [
        vec!["amend", "-f", "raw", "-o", "size=2M", s(&r)],
        vec!["amend", s(&img)],
    ] {
        let (o, q) = (diskimg(&a), qemu_img(&a));
        assert_eq!(code(&o), code(&q), "{a:?}");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).replace("diskimg", "qemu-img"),
            String::from_utf8_lossy(&q.stderr),
            "{a:?}"
        );
    }
}

#[test]
fn amend_dirty_unknown_flags_and_snapshots_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    // iotest 061: downgrading a dirty lazy-refcounts image (killed after a write).
    let p = d.join("dirty.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&p),
        "4M",
    ]);
    let o = crate::qemu_io_raw(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 5 0 128k",
        "-c",
        "abort",
        s(&p),
    ]);
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&p).unwrap()[79] & 1, 1);
    let (ours, _) = both_opts(&p, d, "compat=0.10", false);
    assert_eq!(std::fs::read(&ours).unwrap()[7], 2);
    // Unknown compatible and autoclear bits do not stop a downgrade.
    let p = image(d, "flags.qcow2", "compat=1.1", None);
    let mut img = std::fs::read(&p).unwrap();
    img[87] |= 0x20; // compatible bit 5
    img[95] |= 0x20; // autoclear bit 5
    std::fs::write(&p, &img).unwrap();
    both(&p, d, "compat=0.10");
    // Growing an image with internal snapshots, then downgrading it.
    let p = d.join("snaps.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "4M"]);
    qemu_io(&p, "qcow2", &["write -P 1 0 128k"]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&p)]);
    both(&p, d, "size=8M");
    both(&p, d, "size=8M,compat=0.10");
}

/// `data_file` / `data_file_raw`: renaming the external data file, clearing the raw flag,
/// and qemu's refusals; the resulting image files are byte-identical to qemu's.
#[test]
fn data_file_options_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let with_df = d.join("df.qcow2");
    let df = d.join("df.raw");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&df)),
        s(&with_df),
        "1M",
    ]);
    qemu_io(&with_df, "qcow2", &["write -P 1 0 64k"]);
    let raw_df = d.join("rdf.qcow2");
    let rdf = d.join("rdf.raw");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={},data_file_raw=on", s(&rdf)),
        s(&raw_df),
        "1M",
    ]);
    let plain = d.join("plain.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&plain), "1M"]);
    for (img, opts) in [
        (&with_df, "data_file=other.raw"),
        (&with_df, "data_file="),
        (&with_df, "data_file_raw=on"),
        (&with_df, "data_file_raw=off"),
        (&raw_df, "data_file_raw=off"),
        (&raw_df, "data_file_raw=on"),
        (&plain, "data_file=x.raw"),
        (&plain, "data_file_raw=on"),
        (&plain, "data_file_raw=off"),
    ] {
        let (q, o) = (d.join("q.qcow2"), d.join("o.qcow2"));
        std::fs::copy(img, &q).unwrap();
        std::fs::copy(img, &o).unwrap();
        let qo = qemu_img(&["amend", "-o", opts, s(&q)]);
        let oo = diskimg(&["amend", "-o", opts, s(&o)]);
        assert_eq!(code(&oo), code(&qo), "{opts}");
        assert_eq!(
            String::from_utf8_lossy(&oo.stderr).replace("diskimg", "qemu-img"),
            String::from_utf8_lossy(&qo.stderr),
            "{opts}"
        );
        assert!(
            std::fs::read(&o).unwrap() == std::fs::read(&q).unwrap(),
            "{opts}"
        );
    }
}
