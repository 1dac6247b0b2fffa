//! Images we create and write pass `qemu-img check` and equal what qemu-io makes of the
//! same commands.

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{BlockDevice, Preallocation, ZeroFlags};
use diskimg_testutil::{
    assert_qemu_check_clean, pattern, qemu_compare, qemu_img, qemu_img_ok, qemu_info_json, qemu_io,
    qemu_read_raw, read_all, tempdir,
};

use crate::{create, info_json, open};

/// One guest operation, applied by us and (as a qemu-io command) by qemu.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

impl Op {
    pub(crate) fn qemu(self) -> String {
        match self {
            Op::Write(o, l, b) => format!("write -P {b} {o} {l}"),
            Op::Zero(o, l, false) => format!("write -z {o} {l}"),
            Op::Zero(o, l, true) => format!("write -z -u {o} {l}"),
            Op::Discard(o, l) => format!("discard {o} {l}"),
        }
    }
    pub(crate) fn apply(self, dev: &dyn BlockDevice) {
        match self {
            Op::Write(o, l, b) => dev.write_at(&vec![b; l as usize], o).unwrap(),
            Op::Zero(o, l, u) => dev.write_zeroes(o, l, ZeroFlags { may_unmap: u }).unwrap(),
            Op::Discard(o, l) => dev.discard(o, l).unwrap(),
        }
    }
}

/// Random, overlapping and unaligned writes, zero writes (with and without unmap) and
/// discards, over a 4 MiB disk.
pub(crate) fn workload() -> Vec<Op> {
    let mut ops = vec![
        Op::Write(0, 65536, 1),
        Op::Write(1000, 3000, 2),
        Op::Write(60000, 10000, 3),
        Op::Zero(65536, 131072, false),
        Op::Write(300_000, 700_000, 4),
        Op::Discard(262_144, 262_144),
        Op::Zero(700_000, 100_000, true),
        Op::Write(2 << 20, 1 << 20, 5),
        Op::Zero(2 << 20, 65536, true),
        Op::Zero((2 << 20) + 65536, 65536, false),
        Op::Write((4 << 20) - 512, 512, 6),
        Op::Discard(3 << 20, 1 << 20),
        Op::Write((3 << 20) + 5, 77, 7),
        Op::Discard(100_000, 300_000),
        Op::Zero(1_100_000, 70_000, true),
    ];
    let p = pattern(42, 64);
    for i in 0..16u64 {
        let off = u64::from(p[i as usize]) * 16000 + i * 3;
        ops.push(Op::Write(
            off,
            1 + u64::from(p[i as usize + 16]) * 300,
            8 + i as u8,
        ));
    }
    ops
}

pub(crate) fn qemu_create(path: &Path, opts: &str, size: &str) {
    let ps = path.to_string_lossy().into_owned();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([ps.as_str(), size]);
    qemu_img_ok(&args);
}

pub(crate) fn run_both(
    ours: &Path,
    theirs: &Path,
    ops: &[Op],
    backing: Option<Arc<dyn BlockDevice>>,
) {
    let dev = open(ours, false);
    if let Some(b) = backing {
        dev.set_backing(Some(b)).unwrap();
    }
    for op in ops {
        op.apply(dev.as_ref());
    }
    dev.flush().unwrap();
    let our_bytes = read_all(dev.as_ref());
    drop(dev);
    let cmds: Vec<String> = ops.iter().map(|o| o.qemu()).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(theirs, "qcow2", &refs);
    assert_qemu_check_clean(ours, "qcow2");
    for img in [ours, theirs] {
        let (q, _) = diskimg_testutil::qemu_check_json(img, "qcow2");
        let r = open(img, true).check(Default::default()).unwrap();
        let stats = |r: &diskimg_blockio::CheckReport| {
            (
                r.allocated_clusters,
                r.fragmented_clusters.unwrap_or(0),
                r.compressed_clusters.unwrap_or(0),
                r.image_end_offset,
                r.total_clusters,
            )
        };
        let qs = (
            q["allocated-clusters"].as_u64(),
            // qemu leaves these out when they are zero.
            q["fragmented-clusters"].as_u64().unwrap_or(0),
            q["compressed-clusters"].as_u64().unwrap_or(0),
            q["image-end-offset"].as_u64(),
            q["total-clusters"].as_u64(),
        );
        assert_eq!(stats(&r), qs, "check stats of {}", img.display());
        assert_eq!((r.leaks, r.corruptions), (0, 0), "{}", img.display());
    }
    if !qemu_compare(ours, "qcow2", theirs, "qcow2") {
        let out = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            &ours.to_string_lossy(),
            &theirs.to_string_lossy(),
        ]);
        panic!(
            "{} differs: {}",
            ours.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(our_bytes, qemu_read_raw(theirs, "qcow2"));
}

#[test]
fn every_create_option_checks_clean_and_matches_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    let cases = [
        "",
        "compat=0.10",
        "compat=v2,cluster_size=4k",
        "compat=v3,cluster_size=512",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=4",
        "refcount_bits=8",
        "refcount_bits=32",
        "refcount_bits=64,cluster_size=1k",
        "lazy_refcounts=on",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "compression_type=zstd",
        "preallocation=metadata",
        "preallocation=falloc,cluster_size=256k",
        "preallocation=full,extended_l2=on",
        "data_file=DATA",
        "data_file=DATA,data_file_raw=on",
        "data_file=DATA,extended_l2=on,preallocation=metadata",
    ];
    for (i, o) in cases.iter().enumerate() {
        let ours = d.join(format!("ours{i}.qcow2"));
        let theirs = d.join(format!("theirs{i}.qcow2"));
        let o_ours = o.replace("DATA", &d.join(format!("od{i}.raw")).to_string_lossy());
        let o_theirs = o.replace("DATA", &d.join(format!("td{i}.raw")).to_string_lossy());
        create(&ours, 4 << 20, &o_ours).unwrap();
        qemu_create(&theirs, &o_theirs, "4M");
        assert_qemu_check_clean(&ours, "qcow2");
        let qi = qemu_info_json(&ours, "qcow2");
        let ti = qemu_info_json(&theirs, "qcow2");
        let mut a = qi["format-specific"].clone();
        let mut b = ti["format-specific"].clone();
        a["data"].as_object_mut().unwrap().remove("data-file");
        b["data"].as_object_mut().unwrap().remove("data-file");
        assert_eq!(a, b, "options {o}");
        assert_eq!(qi["cluster-size"], ti["cluster-size"], "options {o}");
        assert_eq!(qi["virtual-size"], ti["virtual-size"], "options {o}");
        // Our own info agrees with qemu's on our image.
        let dev = open(&ours, true);
        let (_, data) = dev.info().format_specific.unwrap();
        assert_eq!(
            info_json(&diskimg_blockio::InfoValue::Map(data)),
            qi["format-specific"]["data"]
        );
        drop(dev);
        run_both(&ours, &theirs, &workload(), None);
    }
}

#[test]
fn overlay_writes_copy_on_write_from_backing() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_create(&base, "", "4M");
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 4M", "write -z 1M 64k"]);
    for (i, o) in [
        "",
        "compat=0.10",
        "extended_l2=on",
        "cluster_size=4k",
        "extended_l2=on,cluster_size=32k,preallocation=metadata",
        "data_file=DATA",
    ]
    .iter()
    .enumerate()
    {
        let opts = if o.is_empty() {
            "backing_file=base.qcow2,backing_fmt=qcow2".to_string()
        } else {
            format!("{o},backing_file=base.qcow2,backing_fmt=qcow2")
        };
        let ours = d.join(format!("o{i}.qcow2"));
        let theirs = d.join(format!("t{i}.qcow2"));
        let o_ours = opts.replace("DATA", &d.join(format!("od{i}.raw")).to_string_lossy());
        let o_theirs = opts.replace("DATA", &d.join(format!("td{i}.raw")).to_string_lossy());
        create(&ours, 4 << 20, &o_ours).unwrap();
        qemu_create(&theirs, &o_theirs, "4M");
        let info = open(&ours, true).info();
        assert_eq!(info.backing.unwrap().format.as_deref(), Some("qcow2"));
        let b = open(&base, true);
        run_both(&ours, &theirs, &workload(), Some(b));
    }
}

#[test]
fn compressed_writes_zlib_and_zstd() {
    let dir = tempdir();
    for (i, o) in [
        "",
        "compression_type=zstd",
        "cluster_size=4k",
        "compat=0.10,cluster_size=2M",
        "extended_l2=on",
    ]
    .iter()
    .enumerate()
    {
        let p = dir.path().join(format!("c{i}.qcow2"));
        create(&p, 8 << 20, o).unwrap();
        let dev = open(&p, false);
        let g = dev.compressed_write_granularity().unwrap();
        let mut want = vec![0u8; 8 << 20];
        let mut off = 0;
        let mut k = 0u64;
        while off + g <= 8 << 20 {
            let mut buf = vec![0u8; g as usize];
            // Compressible text-like data, an incompressible cluster now and then.
            if k % 5 == 3 {
                buf = pattern(k, g as usize);
            } else {
                for (j, b) in buf.iter_mut().enumerate() {
                    *b = b"qcow2 compressed cluster "[(j + k as usize) % 25];
                }
            }
            dev.write_compressed(&buf, off).unwrap();
            want[off as usize..(off + g) as usize].copy_from_slice(&buf);
            off += g * 2;
            k += 1;
        }
        assert!(dev.write_compressed(&vec![1u8; g as usize], 0).is_err());
        // Overwriting part of a compressed cluster makes it a normal one.
        dev.write_at(&[9u8; 100], 10).unwrap();
        want[10..110].fill(9);
        dev.flush().unwrap();
        assert_eq!(read_all(dev.as_ref()), want);
        drop(dev);
        assert_qemu_check_clean(&p, "qcow2");
        assert_eq!(qemu_read_raw(&p, "qcow2"), want, "{o}");
    }
}

#[test]
fn invalid_create_options_fail_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let cases = [
        "compat=0.9",
        "compat=0.10,refcount_bits=8",
        "compat=0.10,extended_l2=on",
        "compat=0.10,lazy_refcounts=on",
        "compat=0.10,compression_type=zstd",
        "compat=0.10,data_file=x.raw",
        "data_file_raw=on",
        "compression_type=lz4",
        "refcount_bits=3",
        "refcount_bits=128",
        "cluster_size=1000",
        "cluster_size=256",
        "cluster_size=4M",
        "extended_l2=on,cluster_size=8k",
        "preallocation=bogus",
        "preallocation=metadata,backing_file=b.raw,backing_fmt=raw",
        "data_file=d.raw,data_file_raw=on,backing_file=b.raw,backing_fmt=raw",
    ];
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "raw",
        &d.join("b.raw").to_string_lossy(),
        "1M",
    ]);
    for (i, o) in cases.iter().enumerate() {
        let p = d.join(format!("bad{i}.qcow2"));
        let q = d.join(format!("qbad{i}.qcow2"));
        let err = create(&p, 1 << 20, o).unwrap_err().to_string();
        let out = qemu_img(&["create", "-f", "qcow2", "-o", o, &q.to_string_lossy(), "1M"]);
        assert!(!out.status.success(), "{o}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&err), "{o}: ours '{err}', qemu '{stderr}'");
    }
}

#[test]
fn many_threads_no_lost_update() {
    let dir = tempdir();
    let p = dir.path().join("mt.qcow2");
    create(&p, 8 << 20, "cluster_size=4k").unwrap();
    let dev = open(&p, false);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let dev = dev.clone();
            s.spawn(move || {
                for i in 0..64u64 {
                    // Interleaved 1 KiB pieces: neighbours share clusters across threads.
                    let off = (i * 4 + t) * 1024 + (i % 8) * 65536;
                    dev.write_at(&[t as u8 + 1; 1024], off).unwrap();
                }
            });
        }
    });
    dev.flush().unwrap();
    let mut want = vec![0u8; 8 << 20];
    for t in 0..4u64 {
        for i in 0..64u64 {
            let off = ((i * 4 + t) * 1024 + (i % 8) * 65536) as usize;
            want[off..off + 1024].fill(t as u8 + 1);
        }
    }
    assert_eq!(read_all(dev.as_ref()), want);
    drop(dev);
    assert_qemu_check_clean(&p, "qcow2");
}

#[test]
fn resize_grows_l1_and_refcount_table() {
    let dir = tempdir();
    let p = dir.path().join("grow.qcow2");
    create(&p, 1 << 20, "cluster_size=512,refcount_bits=64").unwrap();
    let dev = open(&p, false);
    dev.write_at(&[3u8; 4096], 4096).unwrap();
    assert!(dev.resize(512 << 10, Preallocation::Off, false).is_err());
    dev.resize(3 << 30, Preallocation::Off, false).unwrap();
    // Writes spread over the grown disk force refcount table and L1 growth.
    for i in 0..200u64 {
        dev.write_at(&[i as u8; 700], i * 15_000_000 + 300).unwrap();
    }
    dev.flush().unwrap();
    let mut b = [0u8; 700];
    dev.read_at(&mut b, 199 * 15_000_000 + 300).unwrap();
    assert_eq!(b, [199u8; 700]);
    drop(dev);
    assert_qemu_check_clean(&p, "qcow2");
    let q = qemu_info_json(&p, "qcow2");
    assert_eq!(q["virtual-size"], 3u64 << 30);
    let out = qemu_io(
        &p,
        "qcow2",
        &["read -P 199 2985000300 700", "read -P 3 4096 4096"],
    );
    assert!(out.contains("read 700/700"));
}

#[test]
fn unknown_autoclear_bits_cleared_compatible_kept() {
    let dir = tempdir();
    let p = dir.path().join("feat.qcow2");
    qemu_create(&p, "", "1M");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[87] |= 0x20; // compatible bit 5 (unknown)
    bytes[95] |= 0x40; // autoclear bit 6 (unknown)
    std::fs::write(&p, &bytes).unwrap();
    let dev = open(&p, false);
    dev.write_at(&[1u8; 512], 0).unwrap();
    dev.flush().unwrap();
    drop(dev);
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes[87] & 0x20, 0x20);
    assert_eq!(bytes[95] & 0x40, 0);
    assert_qemu_check_clean(&p, "qcow2");
}

#[test]
#[ignore = "timing probe: cargo test -p diskimg-qcow2 --test it -- --ignored --nocapture perf_probe"]
fn perf_probe() {
    // raw -> qcow2 as convert does it (2 MiB writes), against qemu-img convert, and reads.
    let dir = tempdir();
    let raw = dir.path().join("src.raw");
    let src = pattern(7, 128 << 20);
    std::fs::write(&raw, &src).unwrap();
    let q = dir.path().join("q.qcow2");
    let t = std::time::Instant::now();
    qemu_img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &raw.to_string_lossy(),
        &q.to_string_lossy(),
    ]);
    let qemu = t.elapsed();
    let p = dir.path().join("ours.qcow2");
    let t = std::time::Instant::now();
    create(&p, src.len() as u64, "").unwrap();
    let dev = open(&p, false);
    for (i, c) in src.chunks(2 << 20).enumerate() {
        dev.write_at(c, (i as u64) << 21).unwrap();
    }
    let before_flush = t.elapsed();
    dev.flush().unwrap();
    let ours = t.elapsed();
    eprintln!("(before the final flush: {before_flush:?})");
    drop(dev);
    let dev = open(&q, true);
    let t = std::time::Instant::now();
    let mut buf = vec![0u8; 2 << 20];
    for i in 0..(src.len() >> 21) {
        dev.read_at(&mut buf, (i as u64) << 21).unwrap();
    }
    eprintln!(
        "128 MiB raw->qcow2: qemu-img convert {qemu:?}, diskimg writes {ours:?}; read {:?}",
        t.elapsed()
    );
    assert!(qemu_compare(&p, "qcow2", &q, "qcow2"));
}

#[test]
fn concurrent_readers_see_old_or_new_blocks() {
    let dir = tempdir();
    let p = dir.path().join("rw.qcow2");
    create(&p, 4 << 20, "cluster_size=4k,extended_l2=off").unwrap();
    let dev = open(&p, false);
    let block = |i: u64| (i % 251) as u8 + 1;
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let dev = dev.clone();
            s.spawn(move || {
                for i in (t..1024).step_by(2) {
                    dev.write_at(&[block(i); 4096], i * 4096).unwrap();
                }
            });
        }
        for _ in 0..2 {
            let dev = dev.clone();
            s.spawn(move || {
                for _ in 0..4 {
                    let all = read_all(dev.as_ref());
                    for (i, b) in all.chunks(4096).enumerate() {
                        let v = b[0];
                        assert!(v == 0 || v == block(i as u64), "block {i}");
                        assert!(b.iter().all(|&x| x == v), "torn block {i}");
                    }
                }
            });
        }
    });
    dev.flush().unwrap();
    drop(dev);
    assert_qemu_check_clean(&p, "qcow2");
}

#[test]
fn shrink_and_grow_like_qemu_img_resize() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("rbase.qcow2");
    qemu_create(&base, "", "8M");
    qemu_io(&base, "qcow2", &["write -P 0x77 0 8M"]);
    for (i, o) in [
        "cluster_size=4k",
        "compat=0.10",
        "backing_file=rbase.qcow2,backing_fmt=qcow2",
    ]
    .iter()
    .enumerate()
    {
        let ours = d.join(format!("r{i}.qcow2"));
        let theirs = d.join(format!("rt{i}.qcow2"));
        qemu_create(&ours, o, "4M");
        qemu_create(&theirs, o, "4M");
        for p in [&ours, &theirs] {
            qemu_io(
                p,
                "qcow2",
                &[
                    "write -P 1 0 1M",
                    "write -c -P 2 1M 64k",
                    "write -P 3 2M 2M",
                    "write -z 3M 64k",
                ],
            );
        }
        let dev = open(&ours, false);
        if o.contains("backing") {
            dev.set_backing(Some(open(&base, true))).unwrap();
        }
        dev.resize((1 << 20) + 4096, Preallocation::Off, true)
            .unwrap();
        dev.resize(6 << 20, Preallocation::Off, false).unwrap();
        dev.flush().unwrap();
        drop(dev);
        let t = theirs.to_string_lossy().into_owned();
        qemu_img_ok(&[
            "resize",
            "-q",
            "--shrink",
            "-f",
            "qcow2",
            &t,
            &((1u64 << 20) + 4096).to_string(),
        ]);
        qemu_img_ok(&["resize", "-q", "-f", "qcow2", &t, "6M"]);
        assert_qemu_check_clean(&ours, "qcow2");
        assert_eq!(
            qemu_read_raw(&ours, "qcow2"),
            qemu_read_raw(&theirs, "qcow2"),
            "{o}"
        );
    }
}

#[test]
fn grow_with_preallocation_like_qemu() {
    let dir = tempdir();
    for mode in ["metadata", "falloc", "full"] {
        let ours = dir.path().join(format!("pa-{mode}.qcow2"));
        let theirs = dir.path().join(format!("pt-{mode}.qcow2"));
        for p in [&ours, &theirs] {
            qemu_create(p, "cluster_size=4k", "1000k");
            qemu_io(p, "qcow2", &["write -P 1 0 1000k"]);
        }
        let dev = open(&ours, false);
        dev.resize(3 << 20, Preallocation::parse(mode).unwrap(), false)
            .unwrap();
        dev.write_at(&[2u8; 5000], 2 << 20).unwrap();
        drop(dev);
        let t = theirs.to_string_lossy().into_owned();
        qemu_img_ok(&[
            "resize",
            "-q",
            "--preallocation",
            mode,
            "-f",
            "qcow2",
            &t,
            "3M",
        ]);
        qemu_io(&theirs, "qcow2", &["write -P 2 2M 5000"]);
        assert_qemu_check_clean(&ours, "qcow2");
        assert!(qemu_compare(&ours, "qcow2", &theirs, "qcow2"), "{mode}");
        let m = diskimg_testutil::qemu_map_json(&ours, "qcow2");
        assert!(
            m.as_array().unwrap().iter().all(|e| e["present"] == true),
            "{mode}: {m}"
        );
    }
}

/// Library `create` rounds a size that is not a multiple of 512 up to whole sectors, as
/// `qemu-img create` does (qcow2_co_create_opts): the same bytes as qemu's image.
#[test]
fn create_rounds_sizes_up_to_sectors_like_qemu() {
    let dir = tempdir();
    for size in [1u64, 1000, 65535, (1 << 20) + 1] {
        let ours = dir.path().join(format!("ours{size}.qcow2"));
        let theirs = dir.path().join(format!("qemu{size}.qcow2"));
        create(&ours, size, "").unwrap();
        qemu_create(&theirs, "", &size.to_string());
        assert_eq!(open(&ours, true).virtual_size(), size.next_multiple_of(512));
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "size {size}: bytes differ from qemu-img create"
        );
    }
}
