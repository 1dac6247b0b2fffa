//! `-p` output side by side with qemu-img: every verb that takes `-p` (convert, commit,
//! rebase, compare, amend) prints qemu's `    (N.NN/100%)\r` records and final `\n` on
//! stdout. Intermediate percentages depend on each tool's chunking, so they are checked
//! for format and order only; the first and last records, the messages and the end of the
//! output must be the same bytes. Cases whose whole output is deterministic compare every
//! byte.

use std::path::{Path, PathBuf};
use std::process::Output;

use diskimg_testutil::{qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::{diskimg, s};

/// Runs `setup` in two fresh directories, then the same verb through diskimg in one and
/// qemu-img in the other; `args` gets the directory. Returns (diskimg, qemu-img).
fn both(
    root: &Path,
    name: &str,
    setup: &dyn Fn(&Path),
    args: &dyn Fn(&Path) -> Vec<String>,
) -> (Output, Output) {
    let run = |tool: &str| {
        let d = root.join(format!("{name}-{tool}"));
        std::fs::create_dir_all(&d).unwrap();
        setup(&d);
        let a = args(&d);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        if tool == "d" {
            diskimg(&a)
        } else {
            qemu_img(&a)
        }
    };
    (run("d"), run("q"))
}

/// One piece of `-p` output: a progress record (its percentage) or other text.
#[derive(Debug, PartialEq)]
enum Piece {
    Pct(String),
    Text(String),
}

/// Splits stdout into progress records (asserting qemu's exact `    (%3.2f/100%)\r`
/// format) and the text between them.
fn pieces(out: &[u8]) -> Vec<Piece> {
    let text = String::from_utf8(out.to_vec()).unwrap();
    let mut v = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        match rest.find("    (") {
            Some(0) => {
                let end = rest.find("/100%)\r").expect("progress record end");
                let pct = &rest[5..end];
                let (int, frac) = pct.split_once('.').expect("two decimals");
                assert!(
                    frac.len() == 2 && !int.is_empty() && int.len() <= 3,
                    "bad record {rest:?}"
                );
                assert!(pct.parse::<f64>().unwrap() <= 100.0);
                v.push(Piece::Pct(pct.to_string()));
                rest = &rest[end + 7..];
            }
            Some(i) => {
                v.push(Piece::Text(rest[..i].to_string()));
                rest = &rest[i..];
            }
            None => {
                v.push(Piece::Text(rest.to_string()));
                rest = "";
            }
        }
    }
    v
}

/// The pieces with intermediate percentages dropped and repeats collapsed: what must be
/// the same for both tools. Also asserts the percentages never go down.
fn shape(out: &[u8]) -> Vec<Piece> {
    let mut last = 0.0f64;
    let mut v: Vec<Piece> = Vec::new();
    for p in pieces(out) {
        if let Piece::Pct(x) = &p {
            let f = x.parse::<f64>().unwrap();
            assert!(f >= last, "progress went down: {out:?}");
            last = f;
            if x != "0.00" && x != "100.00" {
                continue;
            }
        }
        if v.last() != Some(&p) {
            v.push(p);
        }
    }
    v
}

/// Asserts equal exit codes, equal shapes and an equal ending (the last record and
/// everything after it).
fn same_shape(o: &Output, q: &Output, what: &str) {
    assert_eq!(o.status.code(), q.status.code(), "{what}: {o:?} {q:?}");
    assert_eq!(shape(&o.stdout), shape(&q.stdout), "{what}");
    let tail = |b: &[u8]| {
        let t = String::from_utf8_lossy(b).into_owned();
        match t.rfind("    (") {
            Some(i) => t[i..].to_string(),
            None => t,
        }
    };
    assert_eq!(tail(&o.stdout), tail(&q.stdout), "{what}");
}

fn args(v: &[&str], d: &Path, files: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = v.iter().map(|x| (*x).to_string()).collect();
    a.extend(files.iter().map(|f| s(&d.join(f)).to_string()));
    a
}

fn qcow2(d: &Path, name: &str, size: &str, backing: Option<&str>, writes: &[&str]) -> PathBuf {
    let p = d.join(name);
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        a.extend(["-b", b, "-F", "qcow2"]);
    }
    a.extend([s(&p), size]);
    qemu_img_ok(&a);
    if !writes.is_empty() {
        qemu_io(&p, "qcow2", writes);
    }
    p
}

/// A 16M base with data and a 16M overlay writing over part of it.
fn chain(d: &Path) {
    qcow2(d, "base.qcow2", "16M", None, &["write -P 1 0 8M"]);
    qcow2(
        d,
        "top.qcow2",
        "16M",
        Some("base.qcow2"),
        &["write -P 2 4M 8M"],
    );
    qcow2(d, "new.qcow2", "16M", None, &[]);
}

#[test]
fn convert_progress_like_qemu() {
    let dir = tempdir();
    let r = dir.path();
    let data = |d: &Path| {
        qcow2(d, "a.qcow2", "32M", None, &["write -P 1 0 16M"]);
    };
    let (o, q) = both(r, "data", &data, &|d| {
        args(&["convert", "-p", "-O", "raw"], d, &["a.qcow2", "b.raw"])
    });
    same_shape(&o, &q, "convert with data");
    // Data copied: the copy loop's 100% and the final one, as qemu.
    assert!(
        String::from_utf8_lossy(&o.stdout).ends_with("    (100.00/100%)\r    (100.00/100%)\r\n")
    );
    let empty = |d: &Path| {
        qcow2(d, "a.qcow2", "32M", None, &[]);
    };
    for (name, a) in [
        ("empty", vec!["convert", "-p", "-O", "raw"]),
        ("quiet", vec!["convert", "-q", "-p", "-O", "qcow2"]),
        ("noprogress", vec!["convert", "-O", "qcow2"]),
    ] {
        let (o, q) = both(r, name, &empty, &|d| args(&a, d, &["a.qcow2", "b.img"]));
        assert_eq!(o.status.code(), q.status.code(), "{name}");
        assert_eq!(o.stdout, q.stdout, "{name}");
    }
    let (o, _) = both(r, "empty2", &empty, &|d| {
        args(&["convert", "-p", "-O", "raw"], d, &["a.qcow2", "b.raw"])
    });
    assert_eq!(o.stdout, b"    (0.00/100%)\r    (100.00/100%)\r\n");
    // Refusals before progress starts print nothing; later ones 0% and the newline.
    for (name, a) in [
        (
            "tiz",
            vec!["convert", "-p", "--target-is-zero", "-O", "raw"],
        ),
        ("coroutines", vec!["convert", "-p", "-m", "99", "-O", "raw"]),
        ("sparse", vec!["convert", "-p", "-S", "3", "-O", "raw"]),
        ("unknownfmt", vec!["convert", "-p", "-O", "nonfmt"]),
        ("compressraw", vec!["convert", "-p", "-c", "-O", "raw"]),
        (
            "badopt",
            vec!["convert", "-p", "-o", "foo=1", "-O", "qcow2"],
        ),
        ("nocreate", vec!["convert", "-p", "-n", "-O", "raw"]),
    ] {
        let (o, q) = both(r, name, &empty, &|d| args(&a, d, &["a.qcow2", "b.img"]));
        assert_eq!(o.status.code(), q.status.code(), "{name}");
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&q.stdout),
            "{name}"
        );
    }
    // A source that does not open: 0% was printed before, then the newline.
    let (o, q) = both(r, "missing", &|_| {}, &|d| {
        args(&["convert", "-p", "-O", "raw"], d, &["nope.qcow2", "b.raw"])
    });
    assert_eq!((o.status.code(), &o.stdout), (q.status.code(), &q.stdout));
    assert_eq!(o.stdout, b"    (0.00/100%)\r\n");
}

#[test]
fn commit_progress_like_qemu() {
    let dir = tempdir();
    let r = dir.path();
    let (o, q) = both(r, "commit", &chain, &|d| {
        args(&["commit", "-p"], d, &["top.qcow2"])
    });
    same_shape(&o, &q, "commit");
    assert!(
        String::from_utf8_lossy(&o.stdout).ends_with("    (100.00/100%)\r\nImage committed.\n")
    );
    // No backing file: 0% after the open, then the newline.
    let (o, q) = both(r, "nobacking", &chain, &|d| {
        args(&["commit", "-p"], d, &["base.qcow2"])
    });
    assert_eq!((o.status.code(), &o.stdout), (q.status.code(), &q.stdout));
    assert_eq!(o.stdout, b"    (0.00/100%)\r\n");
    // Not opened: nothing at all; -q: no progress.
    for (name, a, f) in [
        ("missing", vec!["commit", "-p"], "nope.qcow2"),
        ("quiet", vec!["commit", "-p", "-q"], "top.qcow2"),
    ] {
        let (o, q) = both(r, name, &chain, &|d| args(&a, d, &[f]));
        assert_eq!(
            (o.status.code(), &o.stdout),
            (q.status.code(), &q.stdout),
            "{name}"
        );
    }
}

#[test]
fn rebase_progress_like_qemu() {
    let dir = tempdir();
    let r = dir.path();
    let (o, q) = both(r, "safe", &chain, &|d| {
        let mut a = args(&["rebase", "-p", "-F", "qcow2", "-b"], d, &["new.qcow2"]);
        a.push(s(&d.join("top.qcow2")).into());
        a
    });
    same_shape(&o, &q, "safe rebase");
    // Deterministic outputs: unsafe, -q, unopenable image or new backing, missing -F
    // (refused after the copy, with 100% printed).
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "unsafe",
            vec!["rebase", "-p", "-u", "-F", "qcow2", "-b", "new.qcow2"],
        ),
        (
            "quiet",
            vec!["rebase", "-p", "-q", "-F", "qcow2", "-b", "new.qcow2"],
        ),
        (
            "badnew",
            vec!["rebase", "-p", "-F", "raw", "-b", "nonexistent"],
        ),
        ("nofmt", vec!["rebase", "-p", "-u", "-b", "new.qcow2"]),
    ];
    for (name, a) in cases {
        let (o, q) = both(r, name, &chain, &|d| args(&a, d, &["top.qcow2"]));
        assert_eq!(o.status.code(), q.status.code(), "{name}");
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&q.stdout),
            "{name}"
        );
    }
    let (o, q) = both(r, "missing", &chain, &|d| {
        args(&["rebase", "-p", "-u", "-b", ""], d, &["nope.qcow2"])
    });
    assert_eq!((o.status.code(), &o.stdout), (q.status.code(), &q.stdout));
    assert_eq!(o.stdout, b"    (0.00/100%)\r\n");
}

#[test]
fn compare_progress_like_qemu() {
    let dir = tempdir();
    let r = dir.path();
    let imgs = |d: &Path| {
        qcow2(d, "a.qcow2", "16M", None, &["write -P 1 0 4M"]);
        qcow2(d, "b.qcow2", "16M", None, &["write -P 1 0 4M"]);
        qcow2(
            d,
            "c.qcow2",
            "16M",
            None,
            &["write -P 1 0 4M", "write -P 2 6M 64k"],
        );
        qcow2(d, "big.qcow2", "24M", None, &["write -P 1 0 4M"]);
        qcow2(
            d,
            "bigd.qcow2",
            "24M",
            None,
            &["write -P 1 0 4M", "write -P 3 20M 4k"],
        );
        qcow2(d, "bigc.qcow2", "24M", None, &["write -P 2 0 4M"]);
    };
    for (name, a, f) in [
        ("same", vec!["compare", "-p"], ["a.qcow2", "b.qcow2"]),
        ("differ", vec!["compare", "-p"], ["a.qcow2", "c.qcow2"]),
        ("larger", vec!["compare", "-p"], ["a.qcow2", "big.qcow2"]),
        (
            "largerdiff",
            vec!["compare", "-p"],
            ["a.qcow2", "bigd.qcow2"],
        ),
        (
            "strictsize",
            vec!["compare", "-p", "-s"],
            ["a.qcow2", "big.qcow2"],
        ),
        ("quiet", vec!["compare", "-p", "-q"], ["a.qcow2", "c.qcow2"]),
        // Sizes differ but the common part already does: no size warning (as qemu).
        (
            "commondiff",
            vec!["compare", "-p"],
            ["a.qcow2", "bigc.qcow2"],
        ),
        (
            "commondiff-plain",
            vec!["compare"],
            ["a.qcow2", "bigc.qcow2"],
        ),
    ] {
        let (o, q) = both(r, name, &imgs, &|d| args(&a, d, &f));
        same_shape(&o, &q, name);
    }
    // Image not opened: progress was set up, so only its newline.
    let (o, q) = both(r, "missing", &imgs, &|d| {
        args(&["compare", "-p"], d, &["nope.qcow2", "a.qcow2"])
    });
    assert_eq!((o.status.code(), &o.stdout), (q.status.code(), &q.stdout));
    assert_eq!(o.stdout, b"\n");
}

#[test]
fn amend_progress_like_qemu() {
    let dir = tempdir();
    let r = dir.path();
    let img = |d: &Path| {
        qcow2(d, "a.qcow2", "16M", None, &["write -P 1 0 1M"]);
        qemu_img_ok(&["create", "-q", "-f", "raw", s(&d.join("r.raw")), "1M"]);
    };
    for (name, o, f) in [
        ("noop", "compat=1.1", "a.qcow2"),
        ("refused", "compat=0.9", "a.qcow2"),
        ("unknown", "foo=1", "a.qcow2"),
        ("createonly", "cluster_size=4k", "a.qcow2"),
        ("raw", "size=2M", "r.raw"),
        ("missing", "compat=1.1", "nope.qcow2"),
    ] {
        let (o, q) = both(r, name, &img, &|d| args(&["amend", "-p", "-o", o], d, &[f]));
        assert_eq!(o.status.code(), q.status.code(), "{name}");
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&q.stdout),
            "{name}"
        );
    }
    // A real change: qemu's driver reports its own steps in between.
    let (o, q) = both(r, "downgrade", &img, &|d| {
        args(&["amend", "-p", "-o", "compat=0.10"], d, &["a.qcow2"])
    });
    same_shape(&o, &q, "downgrade");
}
