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

/// The same qemu-io command script applied by `diskimg io` and by qemu-io to two images
/// created alike (every format and several create options, with and without a backing
/// file) must leave identical guest content.
#[test]
fn io_workloads_match_a_qemu_io_replica_in_every_format() {
    let script = [
        "write -P 0x11 0 1M",
        "write -P 0x22 700k 100k",
        "write -P 0x33 3M 4097",
        "write -z 800k 300k",
        "write -P 0x44 5000 3000",
        "discard 2M 1M", // a hint: only over unwritten space, where every format agrees
        "write -P 0x55 6M 64k",
        "write -z 6M 512",
        "flush",
    ];
    let cases: &[(&str, &str)] = &[
        ("qcow2", ""),
        ("qcow2", "compat=0.10,cluster_size=4k"),
        ("qcow2", "extended_l2=on,cluster_size=64k"),
        ("qcow2", "refcount_bits=1,lazy_refcounts=on"),
        ("vdi", ""),
        ("vpc", "force_size=on"),
        ("vmdk", ""),
        ("vmdk", "subformat=monolithicFlat"),
        ("vhdx", "block_size=1M"),
        ("raw", ""),
    ];
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    diskimg_testutil::qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    qemu_io(&base, "qcow2", &["write -P 0x99 0 8M"]);
    for (i, (fmt, o)) in cases.iter().enumerate() {
        for backed in [false, true] {
            // Overlays over a qcow2 base: qcow2 only (vmdk parents must be vmdk, which the
            // vmdk crate's tests cover; the other formats have no backing through qemu).
            if backed && *fmt != "qcow2" {
                continue;
            }
            let ours = dir.path().join(format!("ours{i}{backed}.{fmt}"));
            let theirs = dir.path().join(format!("theirs{i}{backed}.{fmt}"));
            for p in [&ours, &theirs] {
                let mut args = vec!["create", "-q", "-f", fmt];
                if !o.is_empty() {
                    args.extend(["-o", o]);
                }
                if backed {
                    args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
                }
                args.push(s(p));
                if !backed {
                    args.push("8M");
                }
                diskimg_testutil::qemu_img_ok(&args);
            }
            let mut ours_args = vec!["io", "-f", fmt];
            for c in script {
                ours_args.extend(["-c", c]);
            }
            ours_args.push(s(&ours));
            diskimg_ok(&ours_args);
            qemu_io(&theirs, fmt, &script);
            assert!(
                diskimg_testutil::qemu_compare(&ours, fmt, &theirs, fmt),
                "{fmt} {o} backed={backed}: content differs from qemu-io's"
            );
            if *fmt != "raw" && *fmt != "vpc" {
                diskimg_testutil::assert_qemu_check_clean(&ours, fmt);
            }
        }
    }
}
