//! Writes through `diskimg serve`: qemu-io patterns land as they do through qemu-nbd,
//! nbdcopy and fio write through it, and SIGTERM leaves a flushed, consistent image.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use diskimg_testutil::{assert_qemu_check_clean, qemu_img_ok, tempdir};

use crate::s;
use crate::serve::{Served, sample_as, tool, tool_ok, visible_map};

/// The qemu-io script run through both servers.
pub(crate) const SCRIPT: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 100k 8k",
    "write -z 1M 128k",
    "write -z -u 2M 1M",
    "discard 3M 512k",
    "write -f -P 0x33 5M 4k",
    "write -P 0 6M 64k",
    "aio_write -P 0x44 7M 64k",
    "aio_write -P 0x45 7232k 64k",
    "aio_flush",
    "write -z -u 9M 64k",
    "discard 15M 1M",
    "flush",
];

pub(crate) fn qemu_io_nbd(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(uri);
    let out = tool_ok("qemu-io", &args);
    assert!(!out.contains("fail"), "{out}");
}

#[test]
fn qemu_io_patterns_land_like_qemu_nbd() {
    let dir = tempdir();
    for (fmt, opts) in [
        ("qcow2", "unmap"),
        ("qcow2", "ignore"),
        ("raw", "unmap"),
        ("vmdk", "unmap"),
    ] {
        let a = sample_as(dir.path(), fmt, "ours");
        let b = sample_as(dir.path(), fmt, "theirs");
        let ours = Served::diskimg(dir.path(), "w-d", &["-f", fmt, "--discard", opts, s(&a)]);
        let theirs = Served::qemu_nbd(dir.path(), "w-q", &["-f", fmt, "--discard", opts, s(&b)]);
        qemu_io_nbd(&ours.uri(), SCRIPT);
        qemu_io_nbd(&theirs.uri(), SCRIPT);
        ours.stop();
        theirs.stop();
        qemu_img_ok(&["compare", "-f", fmt, "-F", fmt, s(&a), s(&b)]);
        if fmt != "raw" {
            assert_qemu_check_clean(&a, fmt);
        }
        // qemu's vmdk allocates zeroed grains where ours leaves them unallocated (the
        // content is the same, compared above); qcow2 and raw allocate alike.
        if fmt != "vmdk" {
            let (ma, mb) = (
                visible_map(s(&a), &["-f", fmt]),
                visible_map(s(&b), &["-f", fmt]),
            );
            assert_eq!(
                ma, mb,
                "{fmt} discard={opts}: allocation differs from qemu-nbd's"
            );
        }
    }
}

#[test]
fn nbdcopy_and_fio_write_through_the_export() {
    let dir = tempdir();
    let img = dir.path().join("w.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 64 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        // Data with holes: every other MiB is zero.
        if (i >> 20) % 2 == 0 {
            *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
        }
    }
    std::fs::write(&src, &data).unwrap();
    let srv = Served::diskimg(
        dir.path(),
        "cp",
        &["-f", "qcow2", "--discard", "unmap", s(&img)],
    );
    tool_ok("nbdcopy", &[s(&src), &srv.uri()]);
    let back = dir.path().join("back.raw");
    tool_ok("nbdcopy", &[&srv.uri(), s(&back)]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip differs"
    );
    // fio's nbd engine: random writes at queue depth 16, verified on read-back.
    let fio = tool(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri()),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--offset=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    );
    assert!(
        fio.status.success(),
        "fio failed: {}{}",
        String::from_utf8_lossy(&fio.stdout),
        String::from_utf8_lossy(&fio.stderr)
    );
    srv.stop();
    assert_qemu_check_clean(&img, "qcow2");
    let s2 = dir.path().join("final.raw");
    qemu_img_ok(&["convert", "-O", "raw", s(&img), s(&s2)]);
    let fin = std::fs::read(&s2).unwrap();
    assert_eq!(fin[..8 << 20], data[..8 << 20]);
    assert_eq!(fin[24 << 20..], data[24 << 20..]);
}

/// A minimal client: GO with structured replies, then one write without a flush.
fn write_unflushed(sock: &std::path::Path, off: u64, byte: u8) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&6u32.to_be_bytes());
    opt.extend_from_slice(&[0; 6]);
    c.write_all(&opt).unwrap();
    // INFO_EXPORT, BLOCK_SIZE, ACK.
    for _ in 0..3 {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        c.read_exact(&mut d).unwrap();
    }
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&[0, 0, 0, 1]);
    req.extend_from_slice(&1u64.to_be_bytes());
    req.extend_from_slice(&off.to_be_bytes());
    req.extend_from_slice(&65536u32.to_be_bytes());
    req.extend_from_slice(&[byte; 65536]);
    c.write_all(&req).unwrap();
    let mut rep = [0u8; 16];
    c.read_exact(&mut rep).unwrap();
    assert_eq!(&rep[4..8], &[0, 0, 0, 0]);
    c
}

#[test]
fn sigterm_and_sigint_flush_and_close() {
    let dir = tempdir();
    for (sig, fmt) in [("TERM", "qcow2"), ("INT", "vhdx")] {
        let img = dir.path().join(format!("sig.{fmt}"));
        qemu_img_ok(&["create", "-q", "-f", fmt, s(&img), "8M"]);
        let srv = Served::diskimg(dir.path(), "sig", &["-f", fmt, s(&img)]);
        // The client stays connected, its write never flushed, when the signal comes.
        let mut c = write_unflushed(&srv.sock, 1 << 20, 0xa5);
        let st = srv.signal(sig);
        assert!(st.success(), "SIG{sig}: {st}");
        let mut b = [0u8; 1];
        assert!(
            matches!(c.read(&mut b), Ok(0) | Err(_)),
            "connection left open"
        );
        assert_qemu_check_clean(&img, fmt);
        let out = tool_ok(
            "qemu-io",
            &["-f", fmt, "-c", "read -P 0xa5 1M 64k", s(&img)],
        );
        assert!(!out.contains("fail"), "{out}");
    }
}
