//! Every format diskimg writes, served and written by real clients through both
//! exports: qemu-io over NBD (the same script through qemu-nbd on a copy is the oracle)
//! and libblkio's `virtio-blk-vhost-user` driver over vhost-user-blk (checked against a
//! model of what it wrote), on images with and without a backing file. Afterwards the
//! images hold what the oracle says (`qemu-img compare`) and `qemu-img check` is clean.
//!
//! The reads of every format through both exports are in serve.rs (NBD clients against
//! qemu-nbd) and in the guest test (a guest's filesystem over vhost-user-blk).

use std::path::Path;

use diskimg_testutil::{Rng, assert_qemu_check_clean, qemu_img_ok, tempdir};
use diskimg_vhost_client::dev::{Device, Done, Seg};

use crate::s;
use crate::serve::{Served, sample_over};
use crate::serve_write::{SCRIPT, qemu_io_nbd};

const MIB: u64 = 1 << 20;

/// Each format with the format of its backing file, if any (qemu creates backing files
/// for qcow2 and vmdk only).
const IMAGES: &[(&str, Option<&str>)] = &[
    ("qcow2", Some("raw")),
    ("qcow2", Some("vdi")),
    ("raw", None),
    ("vmdk", None),
    ("vmdk", Some("vmdk")),
    ("vhdx", None),
    ("vdi", None),
    ("vpc", None),
];

/// Formats `qemu-img check` checks.
fn checkable(fmt: &str) -> bool {
    !matches!(fmt, "raw" | "vpc")
}

fn name(fmt: &str, backing: Option<&str>) -> String {
    backing.map_or(fmt.to_string(), |b| format!("{fmt} over {b}"))
}

#[test]
fn qemu_io_writes_every_format_through_nbd_like_qemu_nbd() {
    let dir = tempdir();
    for (i, &(fmt, backing)) in IMAGES.iter().enumerate() {
        let what = name(fmt, backing);
        let a = sample_over(dir.path(), fmt, backing, &format!("ours{i}"));
        let b = sample_over(dir.path(), fmt, backing, &format!("theirs{i}"));
        let ours = Served::diskimg(dir.path(), "w-d", &["-f", fmt, "--discard", "unmap", s(&a)]);
        let theirs = Served::qemu_nbd(dir.path(), "w-q", &["-f", fmt, "--discard", "unmap", s(&b)]);
        // vpc: diskimg zeroes a discarded range where qemu's vpc leaves the data
        // (docs/formats/vhd.md), so its discards are left out here.
        let script: Vec<&str> = SCRIPT
            .iter()
            .copied()
            .filter(|c| fmt != "vpc" || !c.starts_with("discard"))
            .collect();
        qemu_io_nbd(&ours.uri(), &script);
        qemu_io_nbd(&theirs.uri(), &script);
        ours.stop();
        theirs.stop();
        let o = diskimg_testutil::qemu_img(&["compare", "-f", fmt, "-F", fmt, s(&a), s(&b)]);
        assert!(
            o.status.success(),
            "{what}: differs from qemu-nbd's: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        if checkable(fmt) {
            assert_qemu_check_clean(&a, fmt);
        }
    }
}

/// Waits for every queued request, asserting each succeeded.
fn all_ok(dev: &mut Device, what: &str) {
    let mut out: Vec<Done> = Vec::new();
    while dev.inflight() > 0 {
        dev.wait(1, &mut out).unwrap();
    }
    for d in out {
        assert_eq!(d.ret, 0, "{what}: request {} failed", d.tag);
    }
}

/// `len` bytes of the buffer at `off` in 4 KiB segments (a guest's pages).
fn pages(off: usize, len: usize) -> Vec<Seg> {
    (0..len / 4096)
        .map(|i| Seg {
            off: off + i * 4096,
            len: 4096,
        })
        .collect()
}

/// libblkio's driver writes, zeroes and flushes through `diskimg serve --vhost-user-blk`;
/// returns the image's contents as the driver must find them.
fn drive(sock: &Path, mut model: Vec<u8>, seed: u64, what: &str) -> Vec<u8> {
    let mut dev = Device::connect(s(sock), 1024, 2 << 20, false).unwrap();
    // qemu rounds a VHD's size to its CHS geometry: 16 MiB + 4 KiB here.
    let size = model.len() as u64;
    assert_eq!(dev.limits().unwrap().capacity, size, "{what}");
    let mut rng = Rng(seed);
    let data: Vec<u8> = (0..2 * MIB).map(|_| rng.next_u64() as u8).collect();
    dev.buf().unwrap().copy_from_slice(&data);
    // Over data, zeroes and the backing file's data; one request not cluster aligned;
    // eight in flight at once; the last MiB.
    let writes: &[(u64, usize, usize)] = &[
        (MIB / 2, 0, MIB as usize),
        (2 * MIB + 4096, 1 << 20, 64 << 10),
        (9 * MIB - 4096, 1 << 20, 128 << 10),
        (size / MIB * MIB - MIB, 0, MIB as usize),
    ];
    for (tag, &(at, from, len)) in writes.iter().enumerate() {
        dev.write(at, &pages(from, len), tag).unwrap();
        model[at as usize..][..len].copy_from_slice(&data[from..][..len]);
    }
    for k in 0..8u64 {
        let (at, from) = (12 * MIB + k * (128 << 10), (k * (128 << 10)) as usize);
        dev.write(at, &pages(from, 128 << 10), 10 + k as usize)
            .unwrap();
        model[at as usize..][..128 << 10].copy_from_slice(&data[from..][..128 << 10]);
    }
    all_ok(&mut dev, what);
    // Zeroes kept allocated and zeroes the server may unmap, then a flush.
    dev.write_zeroes(MIB, 8192, false, 20);
    dev.write_zeroes(12 * MIB, 256 << 10, true, 21);
    dev.flush(22);
    all_ok(&mut dev, what);
    model[MIB as usize..][..8192].fill(0);
    model[12 * MIB as usize..][..256 << 10].fill(0);
    // Everything back, 2 MiB at a time (the last piece as one segment).
    let mut at = 0u64;
    while at < size {
        let len = (size - at).min(2 * MIB) as usize;
        let segs = if len.is_multiple_of(4096) {
            pages(0, len)
        } else {
            vec![Seg { off: 0, len }]
        };
        dev.read(at, &segs, 30).unwrap();
        all_ok(&mut dev, what);
        let want = &model[at as usize..][..len];
        assert!(
            dev.buf().unwrap()[..len] == *want,
            "{what}: read-back differs in the 2 MiB at {at}"
        );
        at += len as u64;
    }
    model
}

#[test]
fn libblkio_writes_every_format_through_vhost_user_blk() {
    let dir = tempdir();
    for (i, &(fmt, backing)) in IMAGES.iter().enumerate() {
        let what = name(fmt, backing);
        let img = sample_over(dir.path(), fmt, backing, &format!("v{i}"));
        let before = dir.path().join(format!("v{i}-before.raw"));
        qemu_img_ok(&["convert", "-f", fmt, "-O", "raw", s(&img), s(&before)]);
        let sock = dir.path().join(format!("v{i}.sock"));
        let srv = Served::diskimg_at(&sock, &["--vhost-user-blk", s(&sock), "-f", fmt, s(&img)]);
        let model = drive(&sock, std::fs::read(&before).unwrap(), 40 + i as u64, &what);
        srv.stop();
        let want = dir.path().join(format!("v{i}-model.raw"));
        std::fs::write(&want, &model).unwrap();
        let o = diskimg_testutil::qemu_img(&["compare", "-f", fmt, "-F", "raw", s(&img), s(&want)]);
        assert!(
            o.status.success(),
            "{what}: image differs from what the driver wrote: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        if checkable(fmt) {
            assert_qemu_check_clean(&img, fmt);
        }
    }
}
