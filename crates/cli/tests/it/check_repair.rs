//! `check [-r leaks|all] [--output=json]` on leaky, corrupt and dirty qcow2 images, side
//! by side with qemu-img on identical copies (scenarios of iotests 039, 060 and 138).

use std::path::{Path, PathBuf};

use diskimg_testutil::{assert_qemu_check_clean, qemu_img, qemu_img_ok, qemu_io, tempdir};
use serde_json::Value;

use crate::{code, diskimg, diskimg_ok, s};

/// Two identical copies of `src` ("q.qcow2" for qemu, "d.qcow2" for us) in `dir`.
fn copies(dir: &Path, src: &Path) -> (PathBuf, PathBuf) {
    let (q, d) = (dir.join("q.qcow2"), dir.join("d.qcow2"));
    std::fs::copy(src, &q).unwrap();
    std::fs::copy(src, &d).unwrap();
    (q, d)
}

/// Runs `check ARGS FILE --output=json` with both tools on their copies of `src`;
/// returns ((qemu json, exit, stderr), (ours …)) with filenames made equal.
fn both(dir: &Path, src: &Path, args: &[&str]) -> ((Value, i32, String), (Value, i32, String)) {
    let (q, d) = copies(dir, src);
    let run = |tool: &dyn Fn(&[&str]) -> std::process::Output, p: &Path| {
        let mut a = vec!["check", "--output=json"];
        a.extend(args);
        a.push(s(p));
        let o = tool(&a);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let v = match v {
            Value::Object(mut m) => {
                m.remove("filename");
                Value::Object(m)
            }
            v => v,
        };
        let err = String::from_utf8_lossy(&o.stderr)
            .replace("qemu-img:", "TOOL:")
            .replace("diskimg:", "TOOL:");
        (v, code(&o), err)
    };
    let a = run(&|a| qemu_img(a), &q);
    let b = run(&|a| diskimg(a), &d);
    (a, b)
}

fn refblock0(img: &[u8]) -> usize {
    let rt = u64::from_be_bytes(img[48..56].try_into().unwrap()) as usize;
    u64::from_be_bytes(img[rt..rt + 8].try_into().unwrap()) as usize
}

fn set_refcount(img: &mut [u8], cluster: usize, v: u16) {
    let rb = refblock0(img);
    img[rb + 2 * cluster..rb + 2 * cluster + 2].copy_from_slice(&v.to_be_bytes());
}

fn qcow2_with_data(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, s(&p), "4M"]);
    qemu_io(&p, "qcow2", &["write -P 1 0 192k", "write -P 2 1M 64k"]);
    p
}

#[test]
fn leaks_only_exit_3_and_repair() {
    let dir = tempdir();
    let p = qcow2_with_data(dir.path(), "leak.qcow2", "cluster_size=65536");
    let mut img = std::fs::read(&p).unwrap();
    // The header and the refcount table get one reference too many: leaks only.
    set_refcount(&mut img, 0, 2);
    let rt = u64::from_be_bytes(img[48..56].try_into().unwrap()) as usize / 65536;
    set_refcount(&mut img, rt, 3);
    std::fs::write(&p, &img).unwrap();
    let (q, d) = both(dir.path(), &p, &[]);
    assert_eq!(q.1, 3, "{q:?}");
    assert_eq!(q.0["leaks"], 2);
    assert_eq!(d, q);
    for r in ["leaks", "all"] {
        let (q, d) = both(dir.path(), &p, &["-r", r]);
        assert_eq!(q.1, 0);
        assert_eq!(q.0["leaks-fixed"], 2);
        assert_eq!(d.0, q.0, "-r {r}");
        assert_eq!(d.1, q.1);
        assert_qemu_check_clean(&dir.path().join("d.qcow2"), "qcow2");
    }
    // Human output, repair included, as qemu prints it.
    let (q, d) = copies(dir.path(), &p);
    let qo = qemu_img(&["check", "-r", "leaks", s(&q)]);
    let ours = diskimg(&["check", "-r", "leaks", s(&d)]);
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&qo.stdout)
    );
    assert!(
        String::from_utf8_lossy(&ours.stdout).contains("Double checking the fixed image now...")
    );
}

/// A lazy-refcounts image killed after writes: stale refcounts (iotest 039).
fn dirty_image(dir: &Path) -> PathBuf {
    let p = dir.join("dirty.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&p),
        "64M",
    ]);
    let o = crate::qemu_io_raw(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 7 0 128k",
        "-c",
        "abort",
        s(&p),
    ]);
    assert!(!o.status.success());
    let img = std::fs::read(&p).unwrap();
    assert_eq!(img[79] & 1, 1, "dirty bit set");
    p
}

#[test]
fn corruptions_exit_2_and_leaks_repair_refused() {
    let dir = tempdir();
    let p = dirty_image(dir.path());
    let (q, d) = both(dir.path(), &p, &[]);
    assert_eq!(q.1, 2);
    assert_eq!(d, q);
    // `-r leaks` cannot rebuild refcounts: both fail with the same messages, no JSON.
    let (q, d) = both(dir.path(), &p, &["-r", "leaks"]);
    assert_eq!(q.1, 1);
    assert_eq!(d, q);
    // `-r all` rebuilds the refcount structures where qemu puts them: same numbers,
    // same messages.
    let (q, d) = both(dir.path(), &p, &["-r", "all"]);
    assert_eq!(q.1, 0);
    assert_eq!(q.0["corruptions-fixed"], 2);
    assert_eq!(d, q);
    let fixed = dir.path().join("d.qcow2");
    assert_qemu_check_clean(&fixed, "qcow2");
    assert_eq!(
        std::fs::read(&fixed).unwrap()[79] & 1,
        0,
        "dirty bit cleared"
    );
    assert_eq!(
        diskimg_testutil::qemu_read_raw(&fixed, "qcow2")[..131072],
        [7u8; 131072]
    );
}

#[test]
fn read_write_open_repairs_dirty_image() {
    // iotest 039: a read-only open leaves the image dirty, a read-write one repairs it.
    let dir = tempdir();
    let p = dirty_image(dir.path());
    let out = diskimg_ok(&["io", "-r", "-c", "read -P 7 0 128k", s(&p)]);
    assert!(out.contains("read 131072/131072"), "{out}");
    assert_eq!(std::fs::read(&p).unwrap()[79] & 1, 1, "still dirty");
    diskimg_ok(&["io", "-c", "write -P 8 128k 64k", s(&p)]);
    assert_qemu_check_clean(&p, "qcow2");
    let raw = diskimg_testutil::qemu_read_raw(&p, "qcow2");
    assert_eq!(raw[..131072], [7u8; 131072]);
    assert_eq!(raw[131072..196608], [8u8; 65536]);
}

#[test]
fn repair_at_open_prints_what_qemu_prints() {
    // qemu's tools print the refcount repair of a dirty image to stderr as they open it.
    let dir = tempdir();
    let src = dirty_image(dir.path());
    let (q, d) = copies(dir.path(), &src);
    let qo = crate::qemu_io_raw(&["-f", "qcow2", "-c", "write -P 8 128k 64k", s(&q)]);
    let o = diskimg(&["io", "-f", "qcow2", "-c", "write -P 8 128k 64k", s(&d)]);
    assert_eq!((code(&o), code(&qo)), (0, 0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Repairing cluster"), "{err}");
    assert_eq!(err, String::from_utf8_lossy(&qo.stderr));
    // Opened again (clean now): nothing more to say.
    let again = diskimg(&["io", "-c", "write -P 9 0 512", s(&d)]);
    assert!(
        again.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn corrupt_flag_refuses_writes_and_check_clears_it() {
    // iotest 060: the corrupt bit makes read-write opens fail, read-only opens work, and
    // `check -r all` clears it.
    let dir = tempdir();
    let p = qcow2_with_data(dir.path(), "c.qcow2", "cluster_size=65536");
    let mut img = std::fs::read(&p).unwrap();
    img[79] |= 2;
    std::fs::write(&p, &img).unwrap();
    let w = diskimg(&["io", "-c", "write 0 512", s(&p)]);
    assert_eq!(code(&w), 1);
    let qw = crate::qemu_io_raw(&["-f", "qcow2", "-c", "write 0 512", s(&p)]);
    assert!(String::from_utf8_lossy(&qw.stderr).contains("corrupt"));
    assert!(String::from_utf8_lossy(&w.stderr).contains("corrupt"));
    diskimg_ok(&["io", "-r", "-c", "read -P 1 0 64k", s(&p)]);
    let (q, d) = both(dir.path(), &p, &["-r", "all"]);
    assert_eq!(d, q);
    for f in ["q.qcow2", "d.qcow2"] {
        assert_eq!(std::fs::read(dir.path().join(f)).unwrap()[79] & 2, 0, "{f}");
    }
}

#[test]
fn data_cluster_far_beyond_end_of_file() {
    // iotest 138: an L2 entry pointing 2^32 clusters away is reported, not allocated for.
    let dir = tempdir();
    let p = qcow2_with_data(dir.path(), "far.qcow2", "cluster_size=512");
    let mut img = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(img[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let far: u64 = (1u64 << 63) | (512u64 << 32);
    img[l2..l2 + 8].copy_from_slice(&far.to_be_bytes());
    std::fs::write(&p, &img).unwrap();
    let (q, d) = both(dir.path(), &p, &[]);
    assert_eq!(q.1, 2, "{q:?}");
    assert_eq!(d.0, q.0);
    assert_eq!(d.1, q.1);
}

#[test]
fn rebuild_without_usable_refcount_blocks() {
    // iotest 108: the refcount table no longer points at any refcount block; and a
    // refcount block offset beyond the end of the file.
    let dir = tempdir();
    for case in ["no refblock", "refblock beyond eof"] {
        let p = dir.path().join("nr.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
        qemu_io(&p, "qcow2", &["write -P 1 0 1M", "write -P 2 32M 64k"]);
        let mut img = std::fs::read(&p).unwrap();
        let rt = u64::from_be_bytes(img[48..56].try_into().unwrap()) as usize;
        let v: u64 = if case == "no refblock" { 0 } else { 1 << 40 };
        img[rt..rt + 8].copy_from_slice(&v.to_be_bytes());
        std::fs::write(&p, &img).unwrap();
        let (q, d) = both(dir.path(), &p, &[]);
        if case == "no refblock" {
            assert_eq!(d.1, q.1, "{case}");
            // (Beyond the end of the file, qemu counts a check error and stops
            // comparing; we report each cluster: the numbers differ there.)
            assert_eq!(d.0, q.0, "{case}");
        }
        let (q, d) = both(dir.path(), &p, &["-r", "all"]);
        assert_eq!(q.1, 0, "{case} {q:?}");
        assert_eq!(d.1, 0, "{case} {d:?}");
        if case == "no refblock" {
            assert_eq!(d, q, "{case}");
        }
        // (qemu grows the file over a refcount block beyond its end, to 1 TiB here;
        // we rebuild without it.)
        let ours = dir.path().join("d.qcow2");
        assert_qemu_check_clean(&ours, "qcow2");
        assert!(diskimg_testutil::qemu_compare(
            &ours,
            "qcow2",
            &dir.path().join("q.qcow2"),
            "qcow2"
        ));
        // Writes after the rebuild (which may reuse the freed old structures) stay clean.
        diskimg_ok(&["io", "-c", "write -P 3 40M 1M", s(&ours)]);
        assert_qemu_check_clean(&ours, "qcow2");
    }
}

/// A qcow2 with 1-bit refcounts whose second L2 entry names the first one's cluster
/// (referenced twice: a refcount of 2 cannot be stored); with `leak`, the cluster the
/// second entry had becomes a leak.
fn overflowing(dir: &Path, leak: bool) -> PathBuf {
    let p = dir.join(if leak { "ovl.qcow2" } else { "ov.qcow2" });
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
    let mut cmds = vec!["write -P 1 0 64k"];
    if leak {
        cmds.push("write -P 2 64k 64k");
    }
    qemu_io(&p, "qcow2", &cmds);
    second_entry_names_first_cluster(&p);
    p
}

/// Points the second L2 entry of the first L2 table at the first entry's cluster.
fn second_entry_names_first_cluster(p: &Path) {
    let mut img = std::fs::read(p).unwrap();
    let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(img[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let e0: [u8; 8] = img[l2..l2 + 8].try_into().unwrap();
    img[l2 + 8..l2 + 16].copy_from_slice(&e0);
    std::fs::write(p, &img).unwrap();
}

#[test]
fn refcount_overflow_is_reported_not_repaired() {
    // Issue 15.6: qemu reports "ERROR: overflow cluster …" and repairs nothing (it
    // suggests `qemu-img amend`); only the leak, where there is one, is fixed.
    let dir = tempdir();
    for leak in [false, true] {
        let src = overflowing(dir.path(), leak);
        for r in [None, Some("leaks"), Some("all")] {
            let mut args = vec![];
            if let Some(r) = r {
                args.extend(["-r", r]);
            }
            let (q, d) = both(dir.path(), &src, &args);
            assert_eq!(q.1, 2, "leak={leak} {r:?} {q:?}");
            assert!(q.2.contains("ERROR: overflow cluster offset=0x"), "{}", q.2);
            assert!(q.2.contains("Use qemu-img amend"), "{}", q.2);
            assert_eq!(q.0["corruptions"], 1);
            assert_eq!(q.0.get("corruptions-fixed"), None);
            assert_eq!(d, q, "leak={leak} {r:?}");
            if !leak && r.is_some() {
                let ours = std::fs::read(dir.path().join("d.qcow2")).unwrap();
                assert_eq!(ours, std::fs::read(&src).unwrap(), "nothing repaired");
            }
            // The human report, "found and repaired" included, as qemu prints it.
            let (q, d) = copies(dir.path(), &src);
            let mut a = vec!["check"];
            a.extend(&args);
            let qo = qemu_img(&[&a[..], &[s(&q)]].concat());
            let ours = diskimg(&[&a[..], &[s(&d)]].concat());
            assert_eq!(
                String::from_utf8_lossy(&ours.stdout),
                String::from_utf8_lossy(&qo.stdout),
                "leak={leak} {r:?}"
            );
            assert_eq!(code(&ours), code(&qo));
        }
    }
}

#[test]
fn repair_pass_messages_like_qemu() {
    // A cluster referenced twice with 16-bit refcounts plus a leak: the repairing pass
    // prints every mismatch again ("Repairing …" for what it fixes), the double check
    // prints what is left, and the COPIED flags follow the fixed refcounts.
    let dir = tempdir();
    let p = dir.path().join("twice.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "1M"]);
    qemu_io(&p, "qcow2", &["write -P 1 0 64k", "write -P 2 64k 64k"]);
    second_entry_names_first_cluster(&p);
    for r in [None, Some("leaks"), Some("all")] {
        let mut args = vec![];
        if let Some(r) = r {
            args.extend(["-r", r]);
        }
        let (q, d) = both(dir.path(), &p, &args);
        assert_eq!(d, q, "{r:?}");
    }
    let (q, _) = both(dir.path(), &p, &["-r", "all"]);
    assert!(
        q.2.contains("Repairing OFLAG_COPIED data cluster"),
        "{}",
        q.2
    );
}

/// Refcount table entries qemu's `check_refblocks` rejects: `check`, `-r leaks` and (but
/// for a misaligned block, where qemu's rebuild fails after its corruption event and
/// ours succeeds) `-r all` print what qemu-img prints, exit as it does and leave the
/// same file, byte for byte. A misaligned block: the finding, qemu's corruption event
/// (non-fatal on the read-only open, marking the image corrupt under `-r`), a check
/// error per cluster, "Check failed". A block outside the file: `-r all` grows the file
/// over it, rebuilds, and discards the old structures.
#[test]
fn refcount_table_entries_as_qemu() {
    let dir = tempdir();
    let p = qcow2_with_data(dir.path(), "rt.qcow2", "cluster_size=65536");
    let img = std::fs::read(&p).unwrap();
    let rt = u64::from_be_bytes(img[48..56].try_into().unwrap()) as usize;
    let rb = refblock0(&img) as u64;
    let outside = (img.len() as u64).div_ceil(65536) * 65536 + (20 << 16);
    let cases: [(&str, usize, u64, &[&str]); 2] = [
        ("misaligned", rt, rb + 512, &["leaks"]),
        ("outside", rt + 8, outside, &["leaks", "all"]),
    ];
    for (what, at, v, repairs) in cases {
        let mut bad = img.clone();
        bad[at..at + 8].copy_from_slice(&v.to_be_bytes());
        std::fs::write(&p, &bad).unwrap();
        for r in std::iter::once(None).chain(repairs.iter().map(Some)) {
            let (q, d) = copies(dir.path(), &p);
            let run = |tool: &dyn Fn(&[&str]) -> std::process::Output, f: &Path| {
                let mut a = vec!["check"];
                if let Some(r) = r {
                    a.extend(["-r", r]);
                }
                a.push(s(f));
                let o = tool(&a);
                let err = String::from_utf8_lossy(&o.stderr)
                    .replace("qemu-img:", "TOOL:")
                    .replace("diskimg:", "TOOL:");
                let out = String::from_utf8_lossy(&o.stdout).into_owned();
                (code(&o), out, err, std::fs::read(f).unwrap())
            };
            let want = run(&|a| qemu_img(a), &q);
            if what == "misaligned" {
                assert!(
                    want.2.contains("Can't get refcount for cluster 0"),
                    "{}",
                    want.2
                );
            }
            let got = run(&|a| diskimg(a), &d);
            assert_eq!(got.0, want.0, "{what} {r:?}: exit code");
            assert_eq!((&got.1, &got.2), (&want.1, &want.2), "{what} {r:?}: output");
            assert!(got.3 == want.3, "{what} {r:?}: the file after");
        }
    }
}
