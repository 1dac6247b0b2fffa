//! io: writes verified by qemu-io and the reverse; pattern failures; output lines.

use diskimg_testutil::{qemu_io, tempdir};

use crate::{code, diskimg, diskimg_ok, qemu_io_raw, qemu_raw, s};

/// The request lines (without timing statistics) of qemu-io style output.
fn requests(out: &str) -> Vec<&str> {
    out.lines().filter(|l| !l.contains("ops;")).collect()
}

#[test]
fn our_writes_read_by_qemu_io_and_back() {
    let dir = tempdir();
    let p = qemu_raw(dir.path(), "a.raw", "16M", &[]);
    let cmds = [
        "write -P 0xab 0 64k",
        "write -P 171 1M 4k",
        "write -z 16k 4k",
        "write 2M 512",
        "discard 8M 1M",
        "flush",
        "read -P 0xab 0 16k",
        "read -v 1M 40",
    ];
    let mut args = vec!["io", "-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(s(&p));
    let ours = diskimg_ok(&args);
    // The same commands through qemu-io on a copy print the same request lines.
    let q = qemu_raw(dir.path(), "q.raw", "16M", &[]);
    let mut qargs = vec!["-f", "raw"];
    for c in cmds {
        qargs.extend(["-c", c]);
    }
    qargs.push(s(&q));
    let theirs = qemu_io_raw(&qargs);
    assert_eq!(
        requests(&ours),
        requests(&String::from_utf8_lossy(&theirs.stdout))
    );
    // qemu-io verifies what we wrote.
    qemu_io(
        &p,
        "raw",
        &[
            "read -P 0xab 0 16k",
            "read -P 0 16k 4k",
            "read -P 0xab 20k 44k",
            "read -P 0xab 1M 4k",
            "read -P 0xcd 2M 512",
            "read -P 0 8M 1M",
        ],
    );
    // And we verify what qemu-io writes.
    qemu_io(&p, "raw", &["write -P 0x5c 3M 3k"]);
    diskimg_ok(&[
        "io",
        "-f",
        "raw",
        "-c",
        "read -P 0x5c 3M 3k",
        "-c",
        "read -P 0 3075k 1k",
        s(&p),
    ]);
}

#[test]
fn failures_exit_non_zero() {
    let dir = tempdir();
    let p = qemu_raw(dir.path(), "a.raw", "1M", &["write -P 1 0 4k"]);
    for cmd in [
        "read -P 2 0 4k",
        "read 0 2M",
        "write 1020k 8k",
        "write -c 0 4k",
        "bogus 0 1",
    ] {
        let o = diskimg(&["io", "-f", "raw", "-c", cmd, s(&p)]);
        assert_eq!(code(&o), 1, "{cmd}");
        let q = qemu_io_raw(&["-f", "raw", "-c", cmd, s(&p)]);
        let qs =
            String::from_utf8_lossy(&q.stdout).to_string() + &String::from_utf8_lossy(&q.stderr);
        assert!(
            q.status.code() != Some(0) || qs.contains("failed") || qs.contains("not found"),
            "{cmd}: qemu-io accepted it"
        );
    }
    let o = diskimg(&["io", "-f", "raw", "-c", "read -P 2 0 4k", s(&p)]);
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("Pattern verification failed at offset 0, 4096 bytes")
    );
}
