//! Persistent bitmaps of an image open read-write show the writes made since the open,
//! as qemu's block layer shows them: `Bitmaps::read` on our device must equal what
//! `qemu-nbd -B NAME` exports as `qemu:dirty-bitmap:NAME` after the same writes.

use std::path::Path;

use diskimg::blockio::ZeroFlags;
use diskimg::{ImageOptions, OpenPolicy};
use diskimg_testutil::{qemu_img_ok, qemu_io, tempdir};

use crate::s;
use crate::serve::{Served, nbd_map, tool_ok};

/// The bitmaps: enabled (cluster granularity), enabled (4 KiB), disabled.
const BITMAPS: &[(&str, &[&str])] = &[
    ("b0", &[]),
    ("b4k", &["-g", "4096"]),
    ("off", &["--disable"]),
];

/// The writes made while the image is open: (qemu-io command, offset, length).
const WRITES: &[(&str, u64, u64)] = &[
    ("write -P 0x33 1M 64k", 1 << 20, 64 << 10),
    ("write -P 0x34 1300k 1k", 1300 << 10, 1 << 10),
    ("write -z 2M 4k", 2 << 20, 4 << 10),
    ("discard 3M 128k", 3 << 20, 128 << 10),
];

/// A qcow2 image with [`BITMAPS`], bits set by an earlier qemu-io session (stored).
fn image(p: &Path) {
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(p), "4M"]);
    for (name, opts) in BITMAPS {
        let mut a = vec!["bitmap", "--add"];
        a.extend_from_slice(opts);
        a.extend([s(p), name]);
        qemu_img_ok(&a);
    }
    qemu_io(
        p,
        "qcow2",
        &["write -P 0x11 0 64k", "write -P 0x12 600k 8k"],
    );
}

/// Dirty ranges of `bits` (granularity `g`, a `size`-byte disk) as nbdinfo lists them:
/// (offset, length, "1 dirty" / "0 clean"), runs merged.
fn runs(bits: &[u8], g: u64, size: u64) -> Vec<(u64, u64, String)> {
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    let mut off = 0;
    while off < size {
        let i = off / g;
        let set = bits[(i / 8) as usize] & (1 << (i % 8)) != 0;
        let ty = if set { "1 dirty" } else { "0 clean" }.to_string();
        let len = g.min(size - off);
        match out.last_mut() {
            Some(l) if l.2 == ty => l.1 += len,
            _ => out.push((off, len, ty)),
        }
        off += len;
    }
    out
}

#[test]
fn open_device_bitmaps_show_writes_as_qemu_nbd() {
    let dir = tempdir();
    let (q, d) = (dir.path().join("q.qcow2"), dir.path().join("d.qcow2"));
    image(&q);
    image(&d);

    // qemu: the writes through qemu-nbd, the bitmaps read while it still runs.
    let mut args = vec!["-f", "qcow2", "--discard", "unmap"];
    for (name, _) in BITMAPS {
        args.extend(["-B", name]);
    }
    args.push(s(&q));
    let srv = Served::qemu_nbd(dir.path(), "bq", &args);
    let uri = srv.uri();
    let mut io = vec!["-f", "raw"];
    for (cmd, _, _) in WRITES {
        io.extend(["-c", cmd]);
    }
    io.push(&uri);
    tool_ok("qemu-io", &io);
    let theirs: Vec<_> = BITMAPS
        .iter()
        .map(|(n, _)| nbd_map(&uri, Some(&format!("qemu:dirty-bitmap:{n}"))))
        .collect();
    srv.stop();

    // Ours: the same writes through the library, read before closing.
    let o = ImageOptions::default().with_policy(OpenPolicy::qemu_compatible());
    let img = diskimg::open(&d, None, &o).unwrap();
    let dev = &img.device;
    for &(cmd, off, len) in WRITES {
        match cmd.split(' ').next().unwrap() {
            "discard" => dev.discard(off, len).unwrap(),
            "write" if cmd.contains("-z") => {
                dev.write_zeroes(off, len, ZeroFlags::default()).unwrap()
            }
            _ => dev.write_at(&vec![0x33; len as usize], off).unwrap(),
        }
    }
    let size = dev.virtual_size();
    for ((name, _), theirs) in BITMAPS.iter().zip(&theirs) {
        let b = dev.as_bitmaps().unwrap().read(name).unwrap();
        let ours = runs(&b.bits, b.granularity, size);
        assert_eq!(
            &ours, theirs,
            "bitmap {name}: ours (left) differs from qemu-nbd's"
        );
    }
    img.close().unwrap();

    // Stored on close: both files hold the same bits.
    for (name, _) in BITMAPS {
        let read = |p: &Path| {
            let img = diskimg::open(p, None, &ImageOptions::read_only(true)).unwrap();
            img.device.as_bitmaps().unwrap().read(name).unwrap()
        };
        assert_eq!(read(&d), read(&q), "bitmap {name} as stored");
    }
}
