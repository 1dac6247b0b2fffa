//! The image file qemu leaves behind: a small write into a fresh cluster makes the file
//! reach the cluster's end (qemu writes zeroes over the rest, `handle_alloc_space`), so
//! `qemu-img check`'s "Image end offset" is the file's length. Twin images from
//! qemu-img, written by qemu-io and by us, must be byte-identical.

use diskimg_blockio::{BlockDevice, ZeroFlags};
use diskimg_testutil::{qemu_img_ok, qemu_io, tempdir};

use crate::open;

/// (create options, qemu-io commands); every command is `write [-z] -P n OFF LEN` or
/// `write -z OFF LEN`.
const CASES: &[(&str, &[&str])] = &[
    ("cluster_size=64k", &["write -P 1 0 4k"]),
    (
        "cluster_size=64k",
        &["write -P 1 0 4k", "write -P 2 8M 512", "write -P 3 100k 3k"],
    ),
    (
        "cluster_size=64k",
        &["write -P 1 7k 1k", "write -z 5M 4k", "write -P 4 40M 70k"],
    ),
    (
        "cluster_size=2M",
        &["write -P 1 7k 1k", "write -P 4 40M 70k"],
    ),
    ("cluster_size=4k", &["write -P 1 1k 1k", "write -P 2 9M 6k"]),
    ("extended_l2=on", &["write -P 1 0 4k", "write -P 2 8M 512"]),
    ("compat=0.10", &["write -P 1 3k 1k", "write -P 2 30M 96k"]),
    (
        "lazy_refcounts=on",
        &["write -P 1 0 4k", "write -P 3 100k 3k"],
    ),
];

fn num(s: &str) -> u64 {
    let (n, mul) = match s.strip_suffix('k') {
        Some(n) => (n, 1024),
        None => match s.strip_suffix('M') {
            Some(n) => (n, 1 << 20),
            None => (s, 1),
        },
    };
    n.parse::<u64>().unwrap() * mul
}

/// Runs one qemu-io `write` command (`write -P N OFF LEN`, `write -z [-u] OFF LEN`) on
/// our device.
pub(crate) fn apply(dev: &dyn BlockDevice, cmd: &str) {
    let w: Vec<&str> = cmd.split_whitespace().collect();
    match w.as_slice() {
        ["write", "-z", off, len] => dev
            .write_zeroes(num(off), num(len), ZeroFlags::default())
            .unwrap(),
        ["write", "-z", "-u", off, len] => dev
            .write_zeroes(num(off), num(len), ZeroFlags { may_unmap: true })
            .unwrap(),
        ["write", "-P", p, off, len] => {
            let buf = vec![p.parse::<u8>().unwrap(); num(len) as usize];
            dev.write_at(&buf, num(off)).unwrap();
        }
        _ => panic!("unknown command {cmd}"),
    }
}

#[test]
fn small_writes_into_fresh_clusters_leave_qemus_file() {
    let dir = tempdir();
    for (opts, cmds) in CASES {
        let (q, d) = (dir.path().join("q.qcow2"), dir.path().join("d.qcow2"));
        let qs = q.to_string_lossy().into_owned();
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, &qs, "64M"]);
        std::fs::copy(&q, &d).unwrap();
        qemu_io(&q, "qcow2", cmds);
        let dev = open(&d, false);
        for c in *cmds {
            apply(dev.as_ref(), c);
        }
        dev.close().unwrap();
        drop(dev);
        let (qb, db) = (std::fs::read(&q).unwrap(), std::fs::read(&d).unwrap());
        assert_eq!(db.len(), qb.len(), "{opts} {cmds:?}: file length");
        assert!(db == qb, "{opts} {cmds:?}: bytes differ");
    }
}
