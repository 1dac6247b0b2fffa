//! qemu-img's option handling from qemu-iotests 082 and 103, judged by qemu-img and
//! qemu-io: repeated options (the last wins), `-o` lists (validity, `help`/`?` as an
//! element of the joined lists), `amend -o help`, and qcow2's runtime cache options.

use std::path::Path;

use diskimg_testutil::{qemu_img_ok, tempdir};

use crate::iotest_names::same;
use crate::s;

fn image(dir: &Path) {
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s(&dir.join("t.qcow2")),
        "128M",
    ]);
}

/// iotest 082: `-o` lists and repeated options as qemu-img reads them.
#[test]
fn option_lists_and_repeats_as_qemu_img() {
    let none = |_: &Path| {};
    for args in [
        &["create", "-f", "foo", "-f", "qcow2", "DIR/t.qcow2", "128M"][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "?,cluster_size=4k",
            "DIR/t.qcow2",
            "128M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-o",
            "help",
            "DIR/t.qcow2",
            "128M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=DIR/b,",
            "-o",
            "help",
            "DIR/t.qcow2",
            "128M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=DIR/b",
            "-o",
            ",help",
            "DIR/t.qcow2",
            "128M",
        ],
        &["create", "-f", "bochs", "-o", "help"],
        &["convert", "-O", "qcow2", "-o", ",,", "DIR/a", "DIR/b"],
    ] {
        same(&none, args);
    }
    for args in [
        &["amend", "-f", "qcow2", "-o", "help", "DIR/t.qcow2"][..],
        &["amend", "-f", "qcow2", "-o", "cluster_size=4k,?"],
        &["amend", "-f", "bochs", "-o", "help"],
        &["amend", "-o", "help"],
        &[
            "amend",
            "-f",
            "foo",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "DIR/t.qcow2",
        ],
        &["info", "DIR/t.qcow2"],
    ] {
        same(&image, args);
    }
    let out = same(
        &image,
        &[
            "amend",
            "-f",
            "qcow2",
            "-o",
            "help,cluster_size=4k",
            "DIR/t.qcow2",
        ],
    );
    assert!(out.starts_with("Amend options for 'qcow2':\n"), "{out}");
}

/// iotest 103: qcow2 runtime cache options that qemu refuses are refused with its
/// messages when qemu-io opens the image; valid ones open it.
#[test]
fn qcow2_cache_options_as_qemu_io() {
    for opts in [
        "cache-size=1.25M,l2-cache-size=1M,refcount-cache-size=0.25M",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "l2-cache-entry-size=4242",
        "l2-cache-entry-size=128k",
        "cache-size=2M,l2-cache-size=1M",
        "overlap-check=blubb",
        "lazy-refcounts=42",
    ] {
        let dir = tempdir();
        let t = dir.path().join("t.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&t), "64M"]);
        let open = format!("open -o {opts} {}", s(&t));
        let q = crate::qemu_io_raw(&["-c", &open, "-c", "read 0 512"]);
        let d = crate::diskimg(&["io", "-c", &open, "-c", "read 0 512"]);
        let text = |o: &std::process::Output| {
            let t = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            t.lines()
                .filter(|l| !l.contains(" ops;"))
                .map(|l| l.replacen("diskimg:", "qemu-io:", 1))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(text(&d), text(&q), "{opts}");
        assert_eq!(d.status.code(), q.status.code(), "{opts}");
    }
}
