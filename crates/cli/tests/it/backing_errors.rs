//! A backing file that does not open, on the verbs that open the chain: qemu-img's
//! message and exit code, byte for byte (diskimg installed as `qemu-img`, both run in
//! the same directory). A missing relative backing file is named as qemu combines it
//! with its image's name (`x` beside `top.qcow2`, `d/x` for `d/t.qcow2`, not `./x`),
//! every level of a chain above the failure says `Could not open backing file:`,
//! `check` fails before it starts, and `info --backing-chain` names the layer that does
//! not open by itself. A backing file the open policy refuses (a FIFO, on which
//! qemu-img blocks for ever; a socket) is refused at once with the chain's error.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use diskimg_testutil::{qemu_create, qemu_img_ok, tempdir};

use crate::hostfiles::run_in;
use crate::open_errors::as_qemu_img;

/// `qemu-img create -u`: an overlay of `backing` (which need not exist) at `file`.
fn overlay(dir: &Path, file: &str, backing: &str, backing_fmt: &str) {
    let f = dir.join(file);
    let _ = std::fs::remove_file(&f);
    let f = f.to_string_lossy();
    qemu_img_ok(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_fmt,
        &f,
        "1M",
    ]);
}

/// The images whose backing files do not open.
fn make_images(dir: &Path) {
    std::fs::create_dir_all(dir.join("d")).unwrap();
    overlay(dir, "top.qcow2", "x", "raw");
    overlay(dir, "d/t.qcow2", "x", "raw");
    // Two levels: mid.qcow2 opens, its backing file does not.
    overlay(dir, "mid.qcow2", "b.raw", "raw");
    overlay(dir, "t2.qcow2", "mid.qcow2", "qcow2");
    overlay(dir, "tp.qcow2", "foo:bar", "raw");
}

const IMAGES: &[&str] = &[
    "top.qcow2",
    "./top.qcow2",
    "d/t.qcow2",
    "t2.qcow2",
    "tp.qcow2",
];

const VERBS: &[&str] = &[
    "info FILE",
    "info --backing-chain FILE",
    "check FILE",
    "check -r all FILE",
    "check --output=json FILE",
    "map FILE",
    "convert -O raw FILE out.raw",
    "compare FILE ok.qcow2",
    "compare ok.qcow2 FILE",
    "rebase -b ok.qcow2 -F qcow2 FILE",
    "rebase -u -b ok.qcow2 -F qcow2 FILE",
];

#[test]
fn missing_backing_files_like_qemu_img() {
    let tmp = tempdir();
    let dir = tmp.path();
    let ours = as_qemu_img(dir);
    qemu_create(dir.join("ok.qcow2"), "qcow2", "", Some("1M"));
    make_images(dir);
    let mut differ = Vec::new();
    for image in IMAGES {
        for verb in VERBS {
            let args: Vec<String> = verb.split(' ').map(|w| w.replace("FILE", image)).collect();
            // `rebase` writes the image: each tool gets a fresh one.
            let writes = verb.starts_with("rebase");
            if writes {
                make_images(dir);
            }
            let d = crate::open_errors::run(&ours, dir, &args);
            if writes {
                make_images(dir);
            }
            let q = crate::open_errors::run(Path::new("qemu-img"), dir, &args);
            let _ = std::fs::remove_file(dir.join("out.raw"));
            differ.extend(crate::open_errors::mismatch(&format!("{args:?}"), &d, &q));
        }
    }
    crate::open_errors::assert_none_differ(&differ);
}

/// Whether `qemu-img ARGS` is still running after `wait` (then killed).
fn qemu_img_blocks(dir: &Path, args: &[&str], wait: Duration) -> bool {
    let mut child = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-img runs");
    let start = Instant::now();
    while start.elapsed() < wait {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

#[test]
fn refused_backing_files_give_the_chains_error_at_once() {
    let tmp = tempdir();
    let dir = tmp.path();
    let st = std::process::Command::new("mkfifo")
        .arg(dir.join("fifo"))
        .status()
        .unwrap();
    assert!(st.success());
    let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    std::fs::create_dir(dir.join("dd")).unwrap();
    overlay(dir, "tf.qcow2", "fifo", "raw");
    overlay(dir, "ts.qcow2", "sock", "raw");
    overlay(dir, "td.qcow2", "dd", "raw");
    let ours = env!("CARGO_BIN_EXE_diskimg");
    for (img, file, why) in [
        ("tf.qcow2", "fifo", "it is a FIFO"),
        ("ts.qcow2", "sock", "it is a socket"),
        ("td.qcow2", "dd", "it is a directory"),
    ] {
        let chain = format!(
            "diskimg: Could not open '{img}': refusing to open '{file}' (backing file): {why}"
        );
        for verb in ["info --backing-chain", "check", "map"] {
            let mut args: Vec<&str> = verb.split(' ').collect();
            args.push(img);
            // `run_in` fails the test if diskimg blocks.
            let d = run_in(ours, dir, &args);
            let err = String::from_utf8_lossy(&d.stderr);
            assert!(err.starts_with(&chain), "{args:?}: {err}");
            assert_eq!(d.status.code(), Some(1), "{args:?}: {err}");
            if file == "fifo" {
                // qemu-img opens the FIFO and waits for a writer.
                assert!(
                    qemu_img_blocks(dir, &args, Duration::from_secs(2)),
                    "{args:?}"
                );
                continue;
            }
            // qemu-img fails too, in its file driver's words.
            let q = run_in("qemu-img", dir, &args);
            let qerr = String::from_utf8_lossy(&q.stderr);
            assert_eq!(q.status.code(), Some(1), "{args:?}: {qerr}");
            let qemu_says = match file {
                "sock" => "Could not open 'sock': No such device or address",
                _ => "'file' driver requires 'dd' to be a regular file",
            };
            assert!(qerr.contains(qemu_says), "{args:?}: {qerr}");
        }
    }
}
