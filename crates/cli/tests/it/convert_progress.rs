//! `convert -p` prints the same records as qemu-img, byte for byte, for the same source:
//! qemu's steps (per block-status run, cut at 2 MiB of data, at L2 tables, grains and
//! blocks, at the target's cluster when compressing), not the parallel copy's chunks.
//! Sources are made by qemu-img/qemu-io; each case converts them with both tools.

use std::path::Path;

use diskimg_testutil::{
    Rng, qemu_create, qemu_create_overlay, qemu_img, qemu_img_ok, qemu_io, tempdir,
};

use crate::{diskimg, s};

/// Converts with `-p` and the arguments `args` (the sources and options, the target
/// appended) with both tools into fresh targets in `dir`; asserts the same exit status
/// and stdout and returns the number of progress records.
fn same_records(dir: &Path, name: &str, args: &[&str]) -> usize {
    let run = |tool: &str| {
        let target = dir.join(format!("{name}-{tool}.out"));
        let mut a = vec!["convert", "-p"];
        a.extend(args);
        a.push(s(&target));
        let o = if tool == "d" {
            diskimg(&a)
        } else {
            qemu_img(&a)
        };
        let _ = std::fs::remove_file(&target);
        o
    };
    let (d, q) = (run("d"), run("q"));
    assert!(q.status.success(), "{name}: qemu-img failed: {q:?}");
    assert_eq!(d.status.code(), q.status.code(), "{name}: {d:?}");
    let (ds, qs) = (
        String::from_utf8_lossy(&d.stdout),
        String::from_utf8_lossy(&q.stdout),
    );
    assert_eq!(
        ds, qs,
        "{name}: diskimg's records (left) differ from qemu-img's"
    );
    qs.matches("/100%)\r").count()
}

/// `cd dir`-free file names: every path in `args` is joined to `dir`.
fn at(dir: &Path, f: &str) -> String {
    s(&dir.join(f)).to_string()
}

#[test]
fn iotest_086_images() {
    let dir = tempdir();
    let d = dir.path();
    for fmt in ["qcow2", "raw"] {
        let img = d.join(format!("t.{fmt}"));
        qemu_create(&img, fmt, "", Some("128M"));
        for off in ["0", "2M", "4M", "32M"] {
            qemu_io(&img, fmt, &[&format!("write {off} 1M")]);
        }
        let n = same_records(d, fmt, &["-O", fmt, "-f", fmt, s(&img)]);
        // 0 %, a record per written MiB (25 % each), and the final 100 %.
        assert_eq!(n, 6, "{fmt}");
    }
}

/// A 512 MiB raw image with 40 writes of 4 KiB to 3.5 MiB at scattered offsets.
fn scattered(dir: &Path) -> String {
    let img = dir.join("sp.raw");
    qemu_create(&img, "raw", "", Some("512M"));
    let mut rng = Rng(0x086);
    let cmds: Vec<String> = (1..=40)
        .map(|i| {
            let off = rng.below((512 << 20) / 4096 - 1000) * 4096;
            let len = (rng.below(900) + 1) * 4096;
            format!("write -P {i} {off} {len}")
        })
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, "raw", &cmds);
    s(&img).to_string()
}

#[test]
fn sparse_sources() {
    let dir = tempdir();
    let d = dir.path();
    let raw = scattered(d);
    let q4k = at(d, "sp4k.qcow2");
    qemu_img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        &raw,
        &q4k,
    ]);
    let cases: [(&str, Vec<&str>); 4] = [
        ("raw-qcow2", vec!["-f", "raw", "-O", "qcow2", &raw]),
        ("raw-raw", vec!["-f", "raw", "-O", "raw", &raw]),
        // 4 KiB clusters: an L2 table covers 2 MiB, runs end at each table.
        ("qcow2-4k", vec!["-O", "raw", &q4k]),
        ("qcow2-S0", vec!["-O", "raw", "-S", "0", &q4k]),
    ];
    for (name, a) in cases {
        let n = same_records(d, name, &a);
        assert!(n >= 20, "{name}: only {n} records");
    }
}

#[test]
fn chains_and_backing_targets() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_create(&base, "qcow2", "", Some("256M"));
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 1 0 50M",
            "write -P 2 100M 30M",
            "write -z 60M 10M",
        ],
    );
    let top = d.join("top.qcow2");
    qemu_create_overlay(&top, "qcow2", s(&base), "qcow2", None);
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 3 10M 5M",
            "write -P 4 49M 3M",
            "write -z 110M 1M",
            "write -P 5 200M 7M",
        ],
    );
    let (b, t) = (s(&base), s(&top));
    for (name, a) in [
        ("chain", vec!["-O", "qcow2", t]),
        ("chain-raw", vec!["-O", "raw", t]),
        ("chain-S0", vec!["-O", "qcow2", "-S", "0", t]),
        // -B: only the top layer is copied (the rest is the target's backing).
        ("chain-B", vec!["-O", "qcow2", "-B", b, "-F", "qcow2", t]),
        ("concat", vec!["-O", "qcow2", b, t, b]),
    ] {
        let n = same_records(d, name, &a);
        assert!(n >= 10, "{name}: only {n} records");
    }
}

#[test]
fn compressed_targets_and_sources() {
    let dir = tempdir();
    let d = dir.path();
    let raw = scattered(d);
    let comp = at(d, "comp.qcow2");
    qemu_img_ok(&["convert", "-c", "-f", "raw", "-O", "qcow2", &raw, &comp]);
    for (name, a) in [
        // A cluster per step; zero runs shorter than a cluster count as data.
        (
            "to-compressed",
            vec!["-c", "-f", "raw", "-O", "qcow2", &raw],
        ),
        (
            "to-stream-vmdk",
            vec![
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                &raw,
            ],
        ),
        // Each compressed cluster is a block-status run of its own.
        ("from-compressed", vec!["-O", "raw", &comp]),
    ] {
        let n = same_records(d, name, &a);
        assert!(n >= 20, "{name}: only {n} records");
    }
}

#[test]
fn other_source_formats() {
    let dir = tempdir();
    let d = dir.path();
    let raw = scattered(d);
    // Runs per grain (vmdk), per block (vdi, vpc), all data (vhdx: no block status).
    for (fmt, opts) in [
        ("vmdk", ""),
        ("vmdk", "subformat=monolithicFlat"),
        ("vdi", ""),
        ("vdi", "static=on"),
        ("vpc", ""),
        ("vhdx", ""),
    ] {
        let img = at(d, &format!("src-{}.{fmt}", opts.len()));
        let mut a = vec!["convert", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([raw.as_str(), img.as_str()]);
        qemu_img_ok(&a);
        let name = format!("{fmt} {opts}");
        let n = same_records(d, &name, &["-O", "qcow2", &img]);
        assert!(n >= 20, "{name}: only {n} records");
        std::fs::remove_file(&img).unwrap();
    }
}
