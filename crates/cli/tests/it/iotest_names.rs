//! Image names and small refusals from qemu-iotests (059, 110, 113, 126, 150, 279),
//! judged by qemu-img: diskimg installed as `qemu-img` (a symlink) and the real qemu-img
//! run the same command lines in twin directories and must print the same text.

use std::path::{Path, PathBuf};
use std::process::Command;

use diskimg_testutil::{qemu_img_ok, tempdir};

use crate::s;

/// A `qemu-img` symlink to the diskimg binary in `dir/bin`.
fn dropin(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("qemu-img");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_diskimg"), &link).unwrap();
    link
}

/// Runs `prog args` in `cwd`; stdout and stderr (in that order), `cwd` shown as DIR and
/// the figures that depend on host allocation masked; and the exit code.
fn run(prog: &Path, cwd: &Path, args: &[String]) -> (String, i32) {
    let o = Command::new(prog)
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
    .replace(s(cwd), "DIR");
    let text = text
        .lines()
        .filter(|l| !l.contains("disk size") && !l.contains("actual-size"))
        .collect::<Vec<_>>()
        .join("\n");
    (text, o.status.code().unwrap_or(-1))
}

/// Twin directories set up by `setup`: qemu's, diskimg's, and diskimg as `qemu-img`.
fn twins(setup: &dyn Fn(&Path)) -> (tempfile::TempDir, tempfile::TempDir, PathBuf) {
    let (q, d) = (tempdir(), tempdir());
    let link = dropin(d.path());
    setup(q.path());
    setup(d.path());
    (q, d, link)
}

/// Runs `args` (DIR replaced by each directory) with qemu-img in `q` and with `link` in
/// `d`, asserts the same output and exit code, and returns diskimg's output.
fn same_in(q: &Path, d: &Path, link: &Path, args: &[&str]) -> String {
    let argv = |dir: &Path| -> Vec<String> {
        args.iter()
            .map(|a| a.replace("DIR", s(dir)))
            .collect::<Vec<_>>()
    };
    let qemu = run(Path::new("qemu-img"), q, &argv(q));
    let ours = run(link, d, &argv(d));
    assert_eq!(ours, qemu, "{args:?}");
    ours.0
}

/// [`same_in`] on fresh twin directories set up by `setup`.
pub(super) fn same(setup: &dyn Fn(&Path), args: &[&str]) -> String {
    let (q, d, link) = twins(setup);
    same_in(q.path(), d.path(), &link, args)
}

fn chain(dir: &Path) {
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s(&dir.join("t.qcow2.base")),
        "1M",
    ]);
    crate::qemu_overlay("qcow2", "t.qcow2.base", "qcow2", s(&dir.join("t.qcow2")));
}

/// iotests 110 and 279: a `json:` or `--image-opts` name that only says which format is
/// on which file is shown as the file name; backing names resolve against its directory.
#[test]
fn reconstructable_names_show_the_file() {
    let json = "json:{'driver':'qcow2','file':{'driver':'file','filename':'DIR/t.qcow2'}}";
    let out = same(&chain, &["info", json]);
    assert!(out.starts_with("image: DIR/t.qcow2\n"), "{out}");
    assert!(out.contains("(actual path: DIR/t.qcow2.base)"), "{out}");
    same(&chain, &["info", "--output=json", json]);
    let opts = "driver=qcow2,file.driver=file,file.filename=DIR/t.qcow2";
    let out = same(&chain, &["info", "--backing-chain", "--image-opts", opts]);
    assert!(out.contains("image: DIR/t.qcow2.base"), "{out}");
}

/// iotest 110: a blkdebug node with only `set-state` rules opens in qemu-img (they cannot
/// change anything without `state` conditions); the name stays `json:`, the backing file
/// still resolves against the image file's directory.
#[test]
fn blkdebug_set_state_name_keeps_the_directory() {
    let (q, d) = (tempdir(), tempdir());
    let link = dropin(d.path());
    let mut outs = Vec::new();
    for (prog, dir) in [
        (Path::new("qemu-img"), q.path()),
        (link.as_path(), d.path()),
    ] {
        chain(dir);
        let spec = format!(
            "json:{{'driver':'qcow2','file':{{'driver':'blkdebug','image':{{'driver':'file','filename':'{}'}},'set-state':[{{'event':'read_aio','new_state':42}}]}}}}",
            s(&dir.join("t.qcow2"))
        );
        let (text, code) = run(prog, dir, &["info".into(), spec]);
        assert_eq!(code, 0, "{text}");
        let backing: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("backing file:"))
            .map(str::to_string)
            .collect();
        outs.push(backing);
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(
        outs[1],
        ["backing file: t.qcow2.base (actual path: DIR/t.qcow2.base)"]
    );
}

/// iotest 126: `file:` names the file protocol: the file is created without the prefix,
/// and a name whose rest looks like a protocol is shown behind `./`.
#[test]
fn file_prefix_names_as_qemu() {
    let none = |_: &Path| {};
    same(
        &none,
        &["create", "-f", "qcow2", "file:DIR/a:b.qcow2", "1M"],
    );
    let base = |dir: &Path| {
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            s(&dir.join("base.qcow2")),
            "1M",
        ]);
        crate::qemu_overlay(
            "qcow2",
            "base.qcow2",
            "qcow2",
            s(&dir.join("image:top.qcow2")),
        );
    };
    let out = same(&base, &["info", "file:image:top.qcow2"]);
    assert!(out.starts_with("image: ./image:top.qcow2\n"), "{out}");
    assert!(out.contains("(actual path: ./base.qcow2)"), "{out}");
    // Created without the prefix (diskimg's own name too).
    let d = tempdir();
    let f = d.path().join("c:d.qcow2");
    crate::diskimg_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &format!("file:{}", s(&f)),
        "1M",
    ]);
    assert!(f.exists());
}

/// iotest 113: qemu's read-only formats cannot be created (not "unknown").
#[test]
fn read_only_formats_refuse_creation() {
    let none = |_: &Path| {};
    let out = same(&none, &["create", "-f", "bochs", "DIR/x", "1M"]);
    assert!(out.contains("Format driver 'bochs' does not support image creation"));
    let raw = |dir: &Path| {
        qemu_img_ok(&["create", "-q", "-f", "raw", s(&dir.join("a")), "1M"]);
    };
    same(&raw, &["convert", "-O", "dmg", "DIR/a", "DIR/b"]);
}

/// iotest 150: `convert` reads a `json:` null-co source (zeroes) like any image; the
/// result maps as qemu's does.
#[test]
fn convert_from_json_null_co() {
    let src = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }";
    for fmt in ["raw", "qcow2"] {
        for sparse in ["512", "0"] {
            let (q, d, link) = twins(&|_: &Path| {});
            same_in(
                q.path(),
                d.path(),
                &link,
                &["convert", "-O", fmt, "-S", sparse, src, "DIR/t"],
            );
            // Both results judged by the real qemu-img.
            let qmap = run(Path::new("qemu-img"), q.path(), &["map".into(), "t".into()]);
            let dmap = run(Path::new("qemu-img"), d.path(), &["map".into(), "t".into()]);
            assert_eq!(dmap, qmap, "{fmt} -S {sparse}");
        }
    }
}

/// iotest 059: the extents of a vmdk descriptor are shown with the descriptor's directory
/// (the format-specific part; qemu also lists each extent as a child node).
#[test]
fn vmdk_extent_names_with_directory() {
    let flat = |dir: &Path| {
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentFlat",
            s(&dir.join("sub/t.vmdk")),
            "5G",
        ]);
    };
    // One image for both (the cid is random).
    let (q, d) = (tempdir(), tempdir());
    let link = dropin(d.path());
    flat(q.path());
    let cp = Command::new("cp")
        .args([
            "-r",
            "--sparse=always",
            s(&q.path().join("sub")),
            s(d.path()),
        ])
        .status()
        .unwrap();
    assert!(cp.success());
    let specific = |prog: &Path, dir: &Path| -> String {
        let (text, code) = run(prog, dir, &["info".into(), "sub/t.vmdk".into()]);
        assert_eq!(code, 0, "{text}");
        let from = text.find("Format specific information:").unwrap();
        let to = text.find("Child node").unwrap_or(text.len());
        text.get(from..to).unwrap().to_string()
    };
    let ours = specific(&link, d.path());
    assert_eq!(ours, specific(Path::new("qemu-img"), q.path()));
    assert!(ours.contains("filename: sub/t-f003.vmdk"), "{ours}");
}

/// iotest 198: `info --image-opts` of an encrypted image naming a secret that was not
/// given opens for metadata only (no key needed); the name is qemu's `json:` form.
#[test]
fn info_of_encrypted_image_opts_without_the_secret() {
    let enc = |dir: &Path| {
        qemu_img_ok(&[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=astrochicken",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            s(&dir.join("t.qcow2")),
            "1M",
        ]);
    };
    let (q, d, link) = twins(&enc);
    let spec = |dir: &Path| {
        format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            s(&dir.join("t.qcow2"))
        )
    };
    let specific = |prog: &Path, dir: &Path| -> String {
        let (text, code) = run(
            prog,
            dir,
            &["info".into(), "--image-opts".into(), spec(dir)],
        );
        assert_eq!(code, 0, "{text}");
        assert!(text.starts_with("image: json:{"), "{text}");
        // The LUKS header (uuid, salts) differs per image; compare its shape.
        text.lines()
            .filter(|l| !l.contains("uuid") && !l.contains("iters") && !l.starts_with("image:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        specific(&link, d.path()),
        specific(Path::new("qemu-img"), q.path())
    );
}

/// iotest 110: a format on a `quorum` node reads through the vote; with no directory of
/// its own, a relative backing name cannot be resolved.
#[test]
fn quorum_node_has_no_directory() {
    let setup = |dir: &Path| {
        chain(dir);
        std::fs::copy(dir.join("t.qcow2"), dir.join("t.qcow2.copy")).unwrap();
    };
    let spec = "json:{'driver': 'qcow2', 'file': {'driver': 'quorum', 'vote-threshold': 1, 'children': [{'driver': 'file', 'filename': 'DIR/t.qcow2'}, {'driver': 'file', 'filename': 'DIR/t.qcow2.copy'}]}}";
    let (q, d, link) = twins(&setup);
    let head = |prog: &Path, dir: &Path| -> String {
        let (text, code) = run(prog, dir, &["info".into(), spec.replace("DIR", s(dir))]);
        assert_eq!(code, 0, "{text}");
        text.lines()
            .filter(|l| l.starts_with("backing file:") || l.starts_with("virtual size:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let ours = head(&link, d.path());
    assert_eq!(ours, head(Path::new("qemu-img"), q.path()));
    assert!(ours.contains("(cannot determine actual path)"), "{ours}");
}
