//! Names with a protocol prefix, as qemu-img reads them: `foo:bar` (a colon before any
//! `/`) names the protocol `foo`, so creating verbs refuse it (`foo:bar: Unknown protocol
//! 'foo'`) instead of creating a file, while `./foo:bar`, an absolute path and
//! `file:foo:bar` name the file `foo:bar`. Backing file names stored in an image are read
//! the same way: `foo:bar` is not looked up beside the image, `file:foo:bar` is the file
//! `./foo:bar`. diskimg installed as `qemu-img` and the real qemu-img run each command
//! line in the same directory; their output, exit code and the files left must agree.

use std::path::Path;

use diskimg_testutil::{qemu_create, qemu_img_ok, tempdir};

use crate::open_errors::{as_qemu_img, assert_none_differ, listing, run};
use crate::s;

/// Runs `args` with both tools in `dir` (diskimg first); returns how they differ. The
/// files either created are removed afterwards (`keep`: those qemu-img created stay).
fn differ(ours: &Path, dir: &Path, args: &[&str], keep: bool) -> Option<String> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
    let before = listing(dir);
    let clean = |keep: bool| {
        for f in listing(dir) {
            if !keep && !before.contains(&f) {
                std::fs::remove_file(dir.join(&f)).unwrap();
            }
        }
    };
    let d = run(ours, dir, &args);
    let d_files = listing(dir);
    clean(false);
    let q = run(Path::new("qemu-img"), dir, &args);
    let q_files = listing(dir);
    clean(keep);
    let text = |o: &std::process::Output| {
        format!(
            "({:?}) {}{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let (d, q) = (text(&d), text(&q));
    (d != q || d_files != q_files).then(|| {
        format!("{args:?}\n  diskimg {d}  files {d_files:?}\n  qemu-img {q}  files {q_files:?}")
    })
}

#[test]
fn creating_verbs_refuse_protocol_names() {
    let tmp = tempdir();
    let dir = tmp.path();
    let ours = as_qemu_img(dir);
    qemu_create(dir.join("ok.raw"), "raw", "", Some("1M"));
    let mut diffs = Vec::new();
    for name in ["foo:bar", ":bar", "a:b/c", "qcow2:new.qcow2"] {
        let of = format!("of={name}");
        for args in [
            vec!["create", "-f", "raw", name, "1M"],
            vec!["create", "-f", "qcow2", name, "1M"],
            vec!["convert", "-O", "raw", "ok.raw", name],
            vec!["convert", "-O", "qcow2", "ok.raw", name],
            vec!["convert", "-n", "-O", "raw", "ok.raw", name],
            vec!["dd", "if=ok.raw", &of, "-O", "raw"],
        ] {
            diffs.extend(differ(&ours, dir, &args, false));
        }
    }
    assert_none_differ(&diffs);
    assert_eq!(listing(dir), ["ok.raw"]);
}

#[test]
fn file_names_with_colons_open_the_file() {
    let tmp = tempdir();
    let dir = tmp.path();
    let ours = as_qemu_img(dir);
    qemu_create(dir.join("ok.qcow2"), "qcow2", "", Some("1M"));
    qemu_create(dir.join("ok.raw"), "raw", "", Some("1M"));
    // The merge target's bitmap exists: the source is what is read.
    qemu_img_ok(&["bitmap", "--add", s(&dir.join("ok.qcow2")), "b1"]);
    let abs = s(&dir.join("foo:bar")).to_string();
    let mut diffs = Vec::new();
    for name in ["./foo:bar", "file:foo:bar", abs.as_str()] {
        // Created by both (qemu-img's is kept for the verbs that read it).
        diffs.extend(differ(
            &ours,
            dir,
            &["create", "-f", "raw", name, "1M"],
            false,
        ));
        diffs.extend(differ(
            &ours,
            dir,
            &["convert", "-O", "raw", "ok.raw", name],
            false,
        ));
        let of = format!("of={name}");
        diffs.extend(differ(
            &ours,
            dir,
            &["dd", "if=ok.raw", &of, "-O", "raw"],
            false,
        ));
        diffs.extend(differ(
            &ours,
            dir,
            &["create", "-f", "qcow2", name, "1M"],
            true,
        ));
        assert!(dir.join("foo:bar").exists(), "{name}");
        for args in [
            vec!["info", name],
            vec!["check", name],
            vec!["map", "--output=json", name],
            vec!["measure", "-O", "raw", name],
            vec!["compare", name, "ok.qcow2"],
            vec!["snapshot", "-l", name],
            vec!["convert", "-O", "raw", name, "out.raw"],
            vec!["convert", "-n", "-O", "qcow2", "ok.raw", name],
            vec![
                "create",
                "-f",
                "qcow2",
                "-b",
                name,
                "-F",
                "qcow2",
                "new.qcow2",
            ],
            vec!["rebase", "-b", name, "-F", "qcow2", "ok.qcow2"],
            vec!["bitmap", "--merge", "b0", "-b", name, "ok.qcow2", "b1"],
        ] {
            diffs.extend(differ(&ours, dir, &args, false));
        }
        std::fs::remove_file(dir.join("foo:bar")).unwrap();
        qemu_img_ok(&["rebase", "-u", "-b", "", s(&dir.join("ok.qcow2"))]);
    }
    assert_none_differ(&diffs);
}

#[test]
fn stored_backing_names_with_protocols() {
    let tmp = tempdir();
    let dir = tmp.path();
    let ours = as_qemu_img(dir);
    // The file a `foo:bar` name would reach if it were a file name.
    qemu_create(dir.join("foo:bar"), "raw", "", Some("1M"));
    let mut diffs = Vec::new();
    for backing in ["foo:bar", ":bar", "file:foo:bar", "./foo:bar"] {
        let top = s(&dir.join("top.qcow2")).to_string();
        qemu_create(&top, "qcow2", "", Some("1M"));
        qemu_img_ok(&["rebase", "-u", "-b", backing, "-F", "raw", &top]);
        for args in [
            vec!["map", "top.qcow2"],
            vec!["info", "top.qcow2"],
            // qemu opens each layer by itself: a failure names the backing file.
            vec!["info", "--backing-chain", "top.qcow2"],
            vec!["convert", "-O", "raw", "top.qcow2", "out.raw"],
            vec!["compare", "top.qcow2", "./foo:bar"],
            vec![
                "create",
                "-f",
                "qcow2",
                "-b",
                backing,
                "-F",
                "raw",
                "new.qcow2",
            ],
            vec!["rebase", "-b", backing, "-F", "raw", "top.qcow2"],
            vec!["commit", "top.qcow2"],
        ] {
            diffs.extend(differ(&ours, dir, &args, false));
        }
    }
    assert_none_differ(&diffs);
}

#[test]
fn qemu_io_opens_names_as_qemu_io() {
    let tmp = tempdir();
    let dir = tmp.path();
    as_qemu_img(dir);
    let ours = dir.join("bin/qemu-io");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_diskimg"), &ours).unwrap();
    qemu_create(dir.join("foo:bar"), "raw", "", Some("1M"));
    let mut diffs = Vec::new();
    for name in [
        "foo:bar",
        "nope:bar",
        ":bar",
        "file:foo:bar",
        "file:nope:x",
        "./foo:bar",
        r#"json:{"driver":"raw","file":{"driver":"file","filename":"file:nope:x"}}"#,
    ] {
        let args: Vec<String> = ["-f", "raw", "-c", "read -q 0 512", name]
            .iter()
            .map(|a| (*a).to_string())
            .collect();
        let d = run(&ours, dir, &args);
        let q = run(Path::new("qemu-io"), dir, &args);
        let text = |o: &std::process::Output| {
            format!(
                "({:?}) {}{}",
                o.status.code(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        if text(&d) != text(&q) {
            diffs.push(format!(
                "{name}\n  diskimg {}\n  qemu-io {}",
                text(&d),
                text(&q)
            ));
        }
    }
    assert_none_differ(&diffs);
    assert_eq!(listing(dir), ["foo:bar"]);
}
