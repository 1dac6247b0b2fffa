//! Files an image names, as the CLI reaches them: relative qcow2 data files where qemu
//! puts them (its working directory) as well as beside the image, `info` that never
//! opens a data file, and FIFOs refused instead of hanging (issue 15 item 10, issue 19).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use diskimg_testutil::{qemu_create_overlay, qemu_img_ok, tempdir};

use crate::s;

/// Runs `prog ARGS` in `cwd`, killing it (and failing the test) after 20 s.
pub(crate) fn run_in(prog: &str, cwd: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {prog}: {e}"));
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("{prog} {args:?} hung for 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn diskimg_in(cwd: &Path, args: &[&str]) -> Output {
    run_in(env!("CARGO_BIN_EXE_diskimg"), cwd, args)
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn mkfifo(p: &Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

#[test]
fn relative_data_file_names_work_both_ways_with_qemu() {
    let root = tempdir();
    let cwd = root.path();
    std::fs::create_dir(cwd.join("a")).unwrap();
    // qemu-img creates a relative data file against its working directory …
    let o = run_in(
        "qemu-img",
        cwd,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw",
            "a/q.qcow2",
            "1M",
        ],
    );
    ok(&o);
    assert!(cwd.join("d.raw").exists() && !cwd.join("a/d.raw").exists());
    ok(&run_in(
        "qemu-io",
        cwd,
        &["-c", "write -P 0x42 0 64k", "a/q.qcow2"],
    ));
    // … and we find it there (the image's directory is tried first, then qemu's place).
    ok(&diskimg_in(
        cwd,
        &["io", "-c", "read -P 0x42 0 64k", "a/q.qcow2"],
    ));
    // Moved beside the image, qemu no longer finds it from here; we do.
    std::fs::rename(cwd.join("d.raw"), cwd.join("a/d.raw")).unwrap();
    let q = run_in("qemu-io", cwd, &["-c", "read -P 0x42 0 64k", "a/q.qcow2"]);
    assert!(!q.status.success() || String::from_utf8_lossy(&q.stdout).contains("failed"));
    ok(&diskimg_in(
        cwd,
        &["io", "-c", "read -P 0x42 0 64k", "a/q.qcow2"],
    ));
    ok(&diskimg_in(
        &cwd.join("a"),
        &["io", "-c", "read -P 0x42 0 64k", "q.qcow2"],
    ));

    // We create a relative data file where qemu-img does, so qemu opens our image.
    ok(&diskimg_in(
        cwd,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=e.raw",
            "a/ours.qcow2",
            "1M",
        ],
    ));
    assert!(cwd.join("e.raw").exists() && !cwd.join("a/e.raw").exists());
    ok(&diskimg_in(
        cwd,
        &["io", "-c", "write -P 0x17 64k 64k", "a/ours.qcow2"],
    ));
    let out = ok(&run_in(
        "qemu-io",
        cwd,
        &["-c", "read -P 0x17 64k 64k", "a/ours.qcow2"],
    ));
    assert!(!out.contains("failed"), "{out}");
    let out = ok(&run_in("qemu-img", cwd, &["check", "a/ours.qcow2"]));
    assert!(out.contains("No errors"), "{out}");
}

#[test]
fn info_never_opens_the_data_file() {
    let dir = tempdir();
    let d = dir.path();
    let img = d.join("df.qcow2");
    let data = d.join("data.raw");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&data)),
        s(&img),
        "1M",
    ]);
    std::fs::remove_file(&data).unwrap();
    mkfifo(&data);
    // As qemu-img info, which prints the name without opening the file.
    let out = ok(&diskimg_in(d, &["info", s(&img)]));
    assert!(out.contains(&format!("data file: {}", s(&data))), "{out}");
    let q = ok(&run_in("qemu-img", d, &["info", s(&img)]));
    assert!(q.contains("data file:"), "{q}");
    // Verbs that read guest data refuse the FIFO instead of blocking on it.
    for args in [
        vec!["convert", "-O", "raw", s(&img), "out.raw"],
        vec!["map", s(&img)],
        vec!["check", s(&img)],
    ] {
        let o = diskimg_in(d, &args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("FIFO"), "{args:?}: {err}");
    }
}

#[test]
fn fifo_backing_files_and_extents_are_refused_promptly() {
    let dir = tempdir();
    let d = dir.path();
    mkfifo(&d.join("fifo"));
    let top = d.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&d.join("b.raw")), "1M"]);
    qemu_create_overlay(s(&top), "qcow2", "b.raw", "raw", Some("1M"));
    qemu_img_ok(&["rebase", "-u", "-b", "fifo", "-F", "raw", s(&top)]);
    let vmdk = d.join("d.vmdk");
    std::fs::write(
        &vmdk,
        "version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 8 FLAT \"fifo\" 0\n",
    )
    .unwrap();
    for (img, args) in [
        (&top, vec!["info", "--backing-chain"]),
        (&top, vec!["convert", "-O", "raw"]),
        (&top, vec!["map"]),
        (&vmdk, vec!["info"]),
        (&vmdk, vec!["convert", "-O", "raw"]),
    ] {
        let mut argv = args.clone();
        argv.push(s(img));
        if args[0] == "convert" {
            argv.push("out.raw");
        }
        let o = diskimg_in(d, &argv);
        assert!(!o.status.success(), "{argv:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("FIFO"), "{argv:?}: {err}");
    }
}
