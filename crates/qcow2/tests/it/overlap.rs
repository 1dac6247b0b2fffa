//! Corrupt refcounts must not let an allocation land on metadata (iotest 137): the
//! write fails with `Error::Corrupt`, the image is marked corrupt, and the file is
//! byte for byte what qemu leaves (`qemu-img check` then reports the same).

use std::path::Path;

use diskimg_blockio::Error;
use diskimg_testutil::{qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::open;

/// Creates a 64M image (qemu's default layout: header, refcount table, refcount
/// block, L1 in clusters 0-3), runs the `prep` qemu-io commands, then zeroes the 16-bit
/// refcounts of clusters `first..4`.
fn corrupt_image(p: &Path, prep: &[&str], first: usize) {
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
    if !prep.is_empty() {
        qemu_io(p, "qcow2", prep);
    }
    let mut img = std::fs::read(p).unwrap();
    img[0x20000 + 2 * first..0x20008].fill(0);
    std::fs::write(p, img).unwrap();
}

/// `qemu-img check` output and exit code.
fn check(p: &Path) -> (String, Option<i32>) {
    let out = qemu_img(&["check", "-f", "qcow2", p.to_str().unwrap()]);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
    )
}

/// Runs the write `(off, len)` on a corrupt image with our driver and with qemu-io:
/// ours fails with `Error::Corrupt`, and both files and their checks are the same.
fn refused_like_qemu(prep: &[&str], first: usize, off: u64, len: u64) {
    let dir = tempdir();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("qemu.qcow2");
    corrupt_image(&ours, prep, first);
    corrupt_image(&theirs, prep, first);
    let before = std::fs::read(&ours).unwrap();
    let dev = open(&ours, false);
    let e = dev.write_at(&vec![7u8; len as usize], off).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    drop(dev);
    let cmd = format!("write -P 7 {off} {len}");
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &cmd, theirs.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Marking image as corrupt"),
        "{out:?}"
    );
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    // Clusters 1-3 (refcount table, refcount block, L1) are untouched; the header only
    // gained the corrupt bit, as qemu's.
    let end = before.len().min(0x40000);
    assert_eq!(a[0x10000..end], before[0x10000..end]);
    assert_eq!(a[72..80], [0, 0, 0, 0, 0, 0, 0, 2], "incompatible features");
    assert!(a == b, "file differs from qemu's");
    assert_eq!(check(&ours), check(&theirs));
}

/// iotest 137's last step: the L2 table would be allocated at offset 0.
#[test]
fn l2_table_at_offset_zero_refused_like_qemu() {
    refused_like_qemu(&[], 0, 64 << 10, 64 << 10);
}

/// A data cluster would be allocated on the header.
#[test]
fn data_on_header_refused_like_qemu() {
    refused_like_qemu(&["write -P 1 0 64k"], 0, 1 << 20, 64 << 10);
}

/// A data cluster would be allocated on the refcount table (the header keeps its
/// refcount).
#[test]
fn data_on_refcount_table_refused_like_qemu() {
    refused_like_qemu(&["write -P 1 0 64k"], 1, 1 << 20, 4096);
}
