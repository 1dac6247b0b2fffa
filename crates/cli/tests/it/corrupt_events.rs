//! qcow2 corruption events outside `check`, as qemu reports them (iotest 060): on a
//! read-write open the image is marked corrupt (`qcow2: Marking image as corrupt: …`),
//! on a read-only one (`qemu-io -r`, `qemu-img map`, `convert` and `compare` sources)
//! the event is not fatal (`qcow2: Image is corrupt: …; further non-fatal corruption
//! events will be suppressed`), printed once, and nothing is marked. diskimg installed
//! as `qemu-img`/`qemu-io` (symlinks) and the real tools run the same command lines on
//! fresh copies of the same image; stdout, stderr, exit code and the image's `corrupt`
//! flag afterwards must be equal. After a fatal event the image is gone, as qemu's node
//! without a driver: later requests fail with `No medium found`.

use std::path::Path;
use std::process::Command;

use diskimg_testutil::{qemu_img_ok, tempdir};

use crate::s;

/// L1 table and first L2 table of a new 64 MiB image with 64 KiB clusters (iotest 060).
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;

/// (case, file offset, the 8 bytes written there).
const CASES: &[(&str, u64, u64)] = &[
    // A data cluster offset that is not cluster-aligned.
    ("unaligned L2 entry", L2, 0x8000_0000_0005_2a00),
    // An L2 table offset that is not cluster-aligned.
    ("unaligned L1 entry", L1, 0x8000_0000_0004_2a00),
];

/// The command lines (`IMG`: the image), `qemu-img` or `qemu-io` first.
const CALLS: &[&[&str]] = &[
    &[
        "qemu-io",
        "-r",
        "-c",
        "read -q 0 64k",
        "-c",
        "read -q 0 64k",
        "IMG",
    ],
    &["qemu-img", "map", "IMG"],
    &["qemu-img", "map", "--output=json", "IMG"],
    &["qemu-io", "-c", "read -q 0 64k", "IMG"],
    &["qemu-io", "-c", "write -q 0 64k", "IMG"],
    // After a fatal event the image has no driver left: `No medium found`.
    &[
        "qemu-io",
        "-c",
        "read -q 0 64k",
        "-c",
        "read -q 0 64k",
        "-c",
        "write -q 0 64k",
        "-c",
        "flush",
        "IMG",
    ],
    &[
        "qemu-io",
        "-c",
        "write -q 0 64k",
        "-c",
        "read -q 64k 64k",
        "-c",
        "map",
        "IMG",
    ],
    // A block status that fails: qemu-img compare does not say why.
    &["qemu-img", "compare", "IMG", "IMG"],
];

/// A fresh corrupt image at `t`: 128 KiB written, then the case's entry.
fn corrupt_image(t: &str, at: u64, value: u64) {
    qemu_img_ok(&["create", "-q", "-f", "qcow2", t, "64M"]);
    let out = Command::new("qemu-io")
        .args(["-c", "write -q 0 128k", t])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut b = std::fs::read(t).unwrap();
    let at = usize::try_from(at).unwrap();
    b[at..at + 8].copy_from_slice(&value.to_be_bytes());
    std::fs::write(t, b).unwrap();
}

/// Runs `call` with `bin` (the tools' directory, or `None`: the real ones) on a fresh
/// corrupt image in `dir`: what it printed and the image's `corrupt` flag after.
fn outcome(dir: &Path, bin: Option<&Path>, call: &[&str], (at, value): (u64, u64)) -> String {
    let t = s(&dir.join("t.qcow2")).to_string();
    corrupt_image(&t, at, value);
    let prog = match bin {
        Some(b) => b.join(call[0]),
        None => call[0].into(),
    };
    let args: Vec<&str> = call[1..]
        .iter()
        .map(|a| if *a == "IMG" { t.as_str() } else { a })
        .collect();
    let o = Command::new(prog).args(&args).output().unwrap();
    let info = qemu_img_ok(&["info", "-U", &t]);
    let corrupt = info.lines().find(|l| l.contains("corrupt:")).unwrap_or("");
    format!(
        "({:?})\nstdout: {}\nstderr: {}\n{corrupt}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn corruption_events_fatal_only_when_writable() {
    let tmp = tempdir();
    let dir = tmp.path();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for p in ["qemu-img", "qemu-io"] {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_diskimg"), bin.join(p)).unwrap();
    }
    let mut differ = Vec::new();
    for (case, at, value) in CASES {
        for call in CALLS {
            let q = outcome(dir, None, call, (*at, *value));
            let d = outcome(dir, Some(&bin), call, (*at, *value));
            // The oracle says what this test is about.
            let ro = call.contains(&"-r") || call[0] == "qemu-img";
            let line = if ro {
                "further non-fatal corruption events will be suppressed"
            } else {
                "Marking image as corrupt"
            };
            assert!(q.contains(line), "{case} {call:?}: {q}");
            assert_eq!(q.matches("qcow2: ").count(), 1, "{case} {call:?}: {q}");
            if d != q {
                differ.push(format!("{case}: {call:?}\n--- diskimg\n{d}\n--- qemu\n{q}"));
            }
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
