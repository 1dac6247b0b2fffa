//! Zero writes that may unmap (`qemu-io write -z -u`, NBD `WRITE_ZEROES` without
//! `NO_HOLE` under `--discard unmap`) release host space as qemu does: raw files get a
//! hole punched, qcow2 frees the clusters (zero flag or unallocated) and punches them in
//! the image file (or discards them in its data file). Each scenario runs on two fresh
//! identical images, one changed by qemu, one by diskimg; `map`, `check`, the content and
//! the host file's data ranges (`SEEK_DATA`/`SEEK_HOLE`) must be equal.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use diskimg_blockio::FileStorage;
use diskimg_blockio::Storage;
use diskimg_testutil::{qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::serve::{Served, tool_ok};
use crate::{diskimg_ok, s};

/// The qemu-io script: zero writes with unmap, whole clusters and partial ones, plus a
/// discard (which must treat a data file the same way).
const SCRIPT: &[&str] = &[
    "write -z -u 64k 1M",
    "write -z -u 2M 100k",
    "write -z -u 3M 4k",
    "discard 3200k 128k",
];

/// The byte ranges of `p` that hold data (everything else is a hole).
fn data_ranges(p: &Path) -> Vec<(u64, u64)> {
    let f = FileStorage::open(p, true).unwrap();
    let end = f.len().unwrap();
    let mut out = Vec::new();
    let mut off = 0;
    while off < end {
        let Some(d) = f.next_data(off).unwrap() else {
            break;
        };
        let h = f.next_hole(d).unwrap();
        out.push((d, h));
        off = h;
    }
    out
}

/// Host bytes `p` occupies (`du`): unlike [`data_ranges`] it also counts zeroed
/// (unwritten) extents, which `SEEK_DATA` reports as holes.
fn usage(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Asserts that ours (`d`) occupies what qemu's (`q`) does, give or take the file
/// system's own extent blocks (16 KiB).
fn assert_usage(d: &Path, q: &Path, what: &str) {
    let (du, qu) = (usage(d), usage(q));
    assert!(
        du.abs_diff(qu) <= 16 << 10,
        "{what}: ours uses {du} bytes, qemu's {qu}"
    );
}

/// What qemu can see of `img` (and of its data file `data`, if any) after the script.
fn observe(dir: &Path, fmt: &str, img: &Path, data: Option<&Path>) -> Vec<String> {
    let mut out = vec![
        qemu_img_ok(&["map", "-f", fmt, "--output=json", s(img)]).replace(s(dir), "DIR"),
        format!("{:?}", data_ranges(img)),
    ];
    if fmt != "raw" {
        let c = qemu_img(&["check", "-f", fmt, s(img)]);
        out.push(format!(
            "{:?} {}",
            c.status.code(),
            String::from_utf8_lossy(&c.stdout)
        ));
    }
    if let Some(d) = data {
        out.push(format!("data file {:?}", data_ranges(d)));
    }
    out
}

/// One image set: `fmt` created with `opts` (`@` in them stands for the image's stem),
/// filled with data, then changed by [`SCRIPT`] through qemu-io or `diskimg io`.
fn run(dir: &Path, qemu: bool, fmt: &str, opts: &[&str]) -> (PathBuf, Vec<String>) {
    let stem = if qemu { "q" } else { "d" };
    let img = dir.join(format!("{stem}.img"));
    let mut args = vec!["create".to_string(), "-q".into(), "-f".into(), fmt.into()];
    args.extend(opts.iter().map(|o| o.replace('@', s(&dir.join(stem)))));
    args.extend([s(&img).to_string(), "4M".into()]);
    qemu_img_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    qemu_io(&img, fmt, &["write -P 0x11 0 4M"]);
    if qemu {
        qemu_io(&img, fmt, SCRIPT);
    } else {
        let mut a = vec!["io", "-f", fmt];
        for c in SCRIPT {
            a.extend(["-c", c]);
        }
        a.push(s(&img));
        diskimg_ok(&a);
    }
    let data = opts
        .iter()
        .any(|o| o.contains("data_file="))
        .then(|| dir.join(format!("{stem}.data")));
    let seen = observe(dir, fmt, &img, data.as_deref());
    (img, seen)
}

fn assert_as_qemu(fmt: &str, opts: &[&str]) {
    let dir = tempdir();
    let (q, qs) = run(dir.path(), true, fmt, opts);
    let (d, ds) = run(dir.path(), false, fmt, opts);
    let qs: Vec<String> = qs.iter().map(|x| x.replace("q.", "X.")).collect();
    let ds: Vec<String> = ds.iter().map(|x| x.replace("d.", "X.")).collect();
    assert_eq!(ds, qs, "{fmt} {opts:?}: ours (left) differs from qemu's");
    assert_usage(&d, &q, &format!("{fmt} {opts:?}"));
    if opts.iter().any(|o| o.contains("data_file=")) {
        let data = |stem: &str| dir.path().join(format!("{stem}.data"));
        assert_usage(&data("d"), &data("q"), &format!("{fmt} {opts:?} data file"));
    }
    qemu_img_ok(&["compare", "-f", fmt, "-F", fmt, s(&q), s(&d)]);
}

#[test]
fn raw_zero_unmap_punches_as_qemu() {
    assert_as_qemu("raw", &[]);
}

#[test]
fn qcow2_zero_unmap_frees_and_punches_as_qemu() {
    assert_as_qemu("qcow2", &[]);
    assert_as_qemu("qcow2", &["-o", "compat=0.10"]);
    assert_as_qemu("qcow2", &["-o", "extended_l2=on"]);
    assert_as_qemu("qcow2", &["-o", "data_file=@.data"]);
    assert_as_qemu("qcow2", &["-o", "data_file=@.data,data_file_raw=on"]);
    // 8 KiB subclusters: an unaligned edge piece holds whole 4 KiB host blocks, which
    // qemu zeroes in the raw data file before writing the piece as zero data (so they
    // stay allocated); zeroing after the data write would punch them.
    let o = "cluster_size=256k,extended_l2=on,data_file=@.data,data_file_raw=on";
    assert_as_qemu("qcow2", &["-o", o]);
}

/// With a backing file the zeroed clusters must keep reading as zeroes (v3: zero flag;
/// v2: zero data, nothing freed).
#[test]
fn qcow2_zero_unmap_over_backing_as_qemu() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, "qcow2", &["write -P 0x22 0 4M"]);
    for compat in ["1.1", "0.10"] {
        let o = format!("compat={compat}");
        assert_as_qemu("qcow2", &["-o", &o, "-b", s(&base), "-F", "qcow2"]);
    }
}

/// The same through NBD: qemu-io's `write -z -u` is a `WRITE_ZEROES` without `NO_HOLE`,
/// which `--discard unmap` lets the server pass down as an unmapping zero write.
#[test]
fn nbd_write_zeroes_unmap_punches_as_qemu_nbd() {
    let dir = tempdir();
    for fmt in ["raw", "qcow2"] {
        let mut seen = Vec::new();
        for qemu in [true, false] {
            let img = dir.path().join(if qemu { "q.img" } else { "d.img" });
            qemu_img_ok(&["create", "-q", "-f", fmt, s(&img), "4M"]);
            qemu_io(&img, fmt, &["write -P 0x11 0 4M"]);
            let args = ["-f", fmt, "--discard", "unmap", s(&img)];
            let srv = if qemu {
                Served::qemu_nbd(dir.path(), "zq", &args)
            } else {
                Served::diskimg(dir.path(), "zd", &args)
            };
            let mut a = vec!["-f", "raw"];
            for c in SCRIPT {
                a.extend(["-c", c]);
            }
            let uri = srv.uri();
            a.push(&uri);
            tool_ok("qemu-io", &a);
            srv.stop();
            seen.push(observe(dir.path(), fmt, &img, None));
        }
        assert_eq!(
            seen[1], seen[0],
            "{fmt}: ours (left) differs from qemu-nbd's"
        );
        let img = |n: &str| dir.path().join(n);
        assert_usage(&img("d.img"), &img("q.img"), fmt);
    }
}
