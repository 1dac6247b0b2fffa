//! Bounded cost: every verb of the binary on every image of the hostile corpus
//! (`diskimg_testutil::hostile`) under `prlimit --as=1073741824 --cpu=2` (1 GiB of
//! address space, 2 CPU-seconds), the limits OpenStack puts on `qemu-img info`. Each run
//! must end by itself with a status (never killed by a limit or a signal), and report
//! failures as a one-line `diskimg:` error, never a panic.

use std::process::{Command, Stdio};

use diskimg::{InspectOptions, inspect};
use diskimg_testutil::hostile::{self, Case};
use diskimg_testutil::tempdir;

/// Guests larger than this are mapped over their first GiB only, and not converted: map
/// and convert do work proportional to the guest's extents (as qemu-img does), which a
/// few hundred KiB of qcow2 can make terabytes (issue 15 item 9).
const WHOLE_GUEST: u64 = 1 << 30;

/// Runs `diskimg ARGS` under the limits; returns the exit code, or panics naming the
/// signal that ended it.
fn limited(c: &Case, args: &[&str]) -> i32 {
    let out = Command::new("prlimit")
        .args(["--as=1073741824", "--cpu=2", "--"])
        .arg(env!("CARGO_BIN_EXE_diskimg"))
        .args(args)
        .current_dir(c.path.parent().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run prlimit (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    let Some(code) = out.status.code() else {
        use std::os::unix::process::ExitStatusExt;
        panic!(
            "{} ({}): diskimg {args:?} was killed by signal {:?}: {err}",
            c.name,
            c.what,
            out.status.signal()
        );
    };
    assert!(
        !err.contains("panicked"),
        "{}: {args:?} panicked: {err}",
        c.name
    );
    if code != 0 {
        assert!(
            err.lines().any(|l| l.starts_with("diskimg: "))
                || args[0] == "inspect"
                || args[0] == "check",
            "{}: {args:?} exit {code} without a message: {err}",
            c.name
        );
    }
    code
}

#[test]
fn every_verb_within_one_gib_and_two_cpu_seconds() {
    let dir = tempdir();
    for c in hostile::build(dir.path()) {
        let file = c.path.to_str().unwrap();
        let f = c.format;
        let size = inspect(&c.path, &InspectOptions::default())
            .ok()
            .and_then(|r| r.virtual_size)
            .unwrap_or(0);
        let code = limited(&c, &["inspect", file]);
        assert_eq!(code != 0, c.hostile, "{}: inspect exit {code}", c.name);
        limited(&c, &["info", "-f", f, file]);
        limited(
            &c,
            &["info", "-f", f, "--backing-chain", "--output=json", file],
        );
        limited(&c, &["check", "-f", f, file]);
        if size <= WHOLE_GUEST {
            limited(&c, &["map", "-f", f, "--output=json", file]);
            limited(&c, &["convert", "-f", f, "-O", "raw", file, "out.raw"]);
            limited(&c, &["convert", "-f", f, "-O", "qcow2", file, "out.qcow2"]);
        } else {
            limited(&c, &["map", "-f", f, "-l", "1G", "--output=json", file]);
        }
    }
    let _ = std::fs::remove_file(dir.path().join("out.raw"));
}
