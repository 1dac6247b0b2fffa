//! Images written by qemu read back byte-identical; map and info agree with qemu-img.

use diskimg_blockio::{BlockDevice, Driver, OpenOptions, OptionList, Storage};
use diskimg_testutil::{
    qemu_create_overlay, qemu_img_ok, qemu_info_json, qemu_io, qemu_read_raw, read_all, tempdir,
};
use std::sync::Arc;

use crate::{assert_map_matches, info_json, open};

const MB: u64 = 1 << 20;

fn cluster_size(opts: &str) -> u64 {
    opts.split(',')
        .find_map(|o| o.strip_prefix("cluster_size="))
        .map(|v| diskimg_blockio::parse_size(v).unwrap())
        .unwrap_or(65536)
}

/// qemu-io commands covering every write pattern: aligned, unaligned, zero (with and
/// without unmap), discard, compressed, overwrite of compressed.
fn workload(cs: u64, compressed: bool) -> Vec<String> {
    let mut c = Vec::new();
    if compressed {
        c.push(format!("write -c -P 0x33 {} {cs}", 4 * MB));
        c.push(format!("write -c -P 0x34 {} {cs}", 6 * MB));
        c.push(format!("write -P 0x35 {} 512", 4 * MB + 100));
    }
    for w in [
        "write -P 0xab 0 64k",
        "write -P 0x11 100k 3k",
        "write -P 0x12 5000 700",
        "write -z 1M 256k",
        "write -P 0x22 2M 1M",
        "discard 2M 128k",
        "write -z -u 2560k 128k",
        "write -P 0x23 7M 1k",
        "write -z 7M 512",
    ] {
        c.push(w.to_string());
    }
    c
}

/// The whole disk through `read_vectored_at` (the layout walk: one vectored host read per
/// run) in buffers of odd sizes that cut runs anywhere.
pub(crate) fn read_vectored_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let size = dev.virtual_size() as usize;
    let mut out = vec![0u8; size];
    let mut sizes = [1000usize, 4096, 65536 + 17, 3, 200_000]
        .into_iter()
        .cycle();
    let mut pos = 0;
    while pos < size {
        let end = (pos + 600_000).min(size);
        let mut rest = &mut out[pos..end];
        let mut bufs = Vec::new();
        while !rest.is_empty() {
            let (a, b) = rest.split_at_mut(sizes.next().unwrap().min(rest.len()));
            bufs.push(std::io::IoSliceMut::new(a));
            rest = b;
        }
        dev.read_vectored_at(&mut bufs, pos as u64).unwrap();
        pos = end;
    }
    out
}

fn check_image(path: &std::path::Path) {
    check_image_map(path, true);
}

/// `map`: qemu reports sparse host holes under preallocated clusters as
/// `"data": true, "zero": true`, which an `Extent` cannot express; skip it there.
fn check_image_map(path: &std::path::Path, map: bool) {
    let dev = open(path, true);
    let want = qemu_read_raw(path, "qcow2");
    assert_eq!(read_all(dev.as_ref()), want, "{}", path.display());
    assert_eq!(read_vectored_all(dev.as_ref()), want, "{}", path.display());
    if map {
        assert_map_matches(dev.as_ref(), path);
    }
    let q = qemu_info_json(path, "qcow2");
    let info = dev.info();
    let (ty, data) = info.format_specific.clone().unwrap();
    assert_eq!(ty, "qcow2");
    let ours = info_json(&diskimg_blockio::InfoValue::Map(data));
    assert_eq!(ours, q["format-specific"]["data"], "{}", path.display());
    assert_eq!(info.virtual_size, q["virtual-size"].as_u64().unwrap());
    assert_eq!(info.cluster_size, q["cluster-size"].as_u64());
    assert_eq!(info.dirty, q["dirty-flag"].as_bool().unwrap());
}

#[test]
fn qemu_images_every_option_read_identical() {
    let dir = tempdir();
    let cases = [
        "",
        "cluster_size=512",
        "cluster_size=4k",
        "cluster_size=2M",
        "compat=0.10",
        "compat=0.10,cluster_size=16k",
        "refcount_bits=1",
        "refcount_bits=2,cluster_size=1k",
        "refcount_bits=64",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "compression_type=zstd",
        "compression_type=zstd,extended_l2=on,cluster_size=32k",
        "lazy_refcounts=on",
        "preallocation=metadata",
        "preallocation=falloc,cluster_size=128k",
        "preallocation=full,extended_l2=on",
    ];
    for (i, o) in cases.iter().enumerate() {
        let p = dir.path().join(format!("img{i}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        let ps = p.to_string_lossy().into_owned();
        args.extend([ps.as_str(), "8M"]);
        qemu_img_ok(&args);
        let cmds = workload(cluster_size(o), !o.contains("prealloc"));
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&p, "qcow2", &refs);
        check_image_map(&p, !o.contains("preallocation=metadata"));
    }
}

#[test]
fn backing_chains_raw_and_qcow2_bases() {
    let dir = tempdir();
    let d = dir.path();
    let raw = d.join("base.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", &raw.to_string_lossy(), "4M"]);
    qemu_io(&raw, "raw", &["write -P 0x5a 0 4M"]);
    let mid = d.join("mid.qcow2");
    qemu_create_overlay(&mid, "qcow2", "base.raw", "raw", Some("6M"));
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x61 64k 10k",
            "write -z 1M 64k",
            "discard 2M 64k",
            "write -P 0x62 3900k 300k",
        ],
    );
    let top = d.join("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &top.to_string_lossy(),
        "8M",
    ]);
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x71 70k 2k",
            "write -z 2100k 8k",
            "write -P 0x72 5M 4k",
        ],
    );

    let base_dev: Arc<dyn BlockDevice> = diskimg_raw::DRIVER
        .open(
            Arc::new(diskimg_blockio::FileStorage::open(&raw, true).unwrap()),
            &OpenOptions::new().read_only(true),
        )
        .unwrap();
    let mid_dev = open(&mid, true);
    assert_eq!(
        mid_dev.info().backing.unwrap().format.as_deref(),
        Some("raw")
    );
    mid_dev.set_backing(Some(base_dev)).unwrap();
    let top_dev = open(&top, true);
    assert_eq!(top_dev.info().backing.unwrap().filename, "mid.qcow2");
    top_dev.set_backing(Some(mid_dev.clone())).unwrap();
    assert_eq!(read_all(mid_dev.as_ref()), qemu_read_raw(&mid, "qcow2"));
    assert_eq!(read_all(top_dev.as_ref()), qemu_read_raw(&top, "qcow2"));
    assert_map_matches(top_dev.as_ref(), &top);
    assert_map_matches(mid_dev.as_ref(), &mid);
}

#[test]
fn internal_snapshots_read_as_qemu_convert_l() {
    let dir = tempdir();
    let p = dir.path().join("s.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &p.to_string_lossy(), "4M"]);
    qemu_io(&p, "qcow2", &["write -P 0x01 0 1M"]);
    qemu_img_ok(&["snapshot", "-c", "first", &p.to_string_lossy()]);
    qemu_io(&p, "qcow2", &["write -P 0x02 512k 1M", "write -z 0 64k"]);
    qemu_img_ok(&["snapshot", "-c", "second", &p.to_string_lossy()]);
    qemu_io(&p, "qcow2", &["discard 0 4M", "write -P 0x03 3M 4k"]);
    let dev = open(&p, true);
    let q = qemu_info_json(&p, "qcow2");
    let snaps = dev.info().snapshots;
    assert_eq!(snaps.len(), 2);
    for (s, qs) in snaps.iter().zip(q["snapshots"].as_array().unwrap()) {
        assert_eq!(s.id, qs["id"].as_str().unwrap());
        assert_eq!(s.name, qs["name"].as_str().unwrap());
        assert_eq!(s.date_sec, qs["date-sec"].as_u64().unwrap());
        assert_eq!(s.date_nsec as u64, qs["date-nsec"].as_u64().unwrap());
    }
    assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&p, "qcow2"));
    let q2 = diskimg_qcow2::Qcow2Device::open(
        Arc::new(diskimg_blockio::FileStorage::open(&p, true).unwrap()),
        &OpenOptions::new().read_only(true),
    )
    .unwrap();
    for name in ["first", "second", "1"] {
        let sel = if name == "1" {
            "snapshot.id=1".to_string()
        } else {
            format!("snapshot.name={name}")
        };
        let want = crate::qemu_snapshot_raw(&p, &sel);
        let view = q2.open_snapshot(name).unwrap();
        assert_eq!(read_all(view.as_ref()), want, "snapshot {name}");
        assert!(view.write_at(&[1], 0).is_err());
        // The same through the driver option.
        let mut o = OpenOptions::new().read_only(true);
        o.driver_options = OptionList::parse(&sel).unwrap();
        let s: Arc<dyn Storage> = Arc::new(diskimg_blockio::FileStorage::open(&p, true).unwrap());
        let v2 = diskimg_qcow2::DRIVER.open(s, &o).unwrap();
        assert_eq!(read_all(v2.as_ref()), want);
    }
    assert!(q2.open_snapshot("nope").is_err());
}

#[test]
fn external_data_file_raw_and_not() {
    let dir = tempdir();
    for (i, o) in ["", ",data_file_raw=on", ",extended_l2=on,cluster_size=128k"]
        .iter()
        .enumerate()
    {
        let p = dir.path().join(format!("x{i}.qcow2"));
        let o = &format!(
            "data_file={}{o}",
            dir.path().join(format!("d{i}.raw")).display()
        );
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            o,
            &p.to_string_lossy(),
            "4M",
        ]);
        qemu_io(
            &p,
            "qcow2",
            &[
                "write -P 0x41 0 100k",
                "write -z 1M 128k",
                "write -P 0x42 1100k 1k",
                "discard 0 64k",
            ],
        );
        check_image(&p);
    }
}

#[test]
fn dirty_image_after_abort_reads_and_repairs() {
    let dir = tempdir();
    let p = dir.path().join("dirty.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        &p.to_string_lossy(),
        "4M",
    ]);
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 0 200k",
            "-c",
            "abort",
            &p.to_string_lossy(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let q = qemu_info_json(&p, "qcow2");
    assert_eq!(q["dirty-flag"], true);
    let dev = open(&p, true);
    assert!(dev.info().dirty);
    assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&p, "qcow2"));
    drop(dev);
    let dev = open(&p, false);
    assert!(!dev.info().dirty);
    drop(dev);
    diskimg_testutil::assert_qemu_check_clean(&p, "qcow2");
}

#[test]
fn huge_virtual_size_beyond_4tib() {
    let dir = tempdir();
    let p = dir.path().join("big.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &p.to_string_lossy(), "6T"]);
    qemu_io(
        &p,
        "qcow2",
        &["write -P 0x99 4947802324992 64k", "write -P 0x98 5T 4k"],
    );
    let dev = open(&p, true);
    assert_eq!(dev.virtual_size(), 6 << 40);
    let mut buf = vec![0u8; 128 << 10];
    dev.read_at(&mut buf, 4947802324992 - (32 << 10)).unwrap();
    assert!(buf[..32 << 10].iter().all(|&b| b == 0));
    assert!(buf[32 << 10..96 << 10].iter().all(|&b| b == 0x99));
    dev.read_at(&mut buf[..4096], 5 << 40).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x98));
    assert_map_matches(dev.as_ref(), &p);
}

#[test]
fn bitmaps_listed_and_writable() {
    let dir = tempdir();
    let p = dir.path().join("bm.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &p.to_string_lossy(), "4M"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "64K", &p.to_string_lossy(), "bm1"]);
    qemu_img_ok(&["bitmap", "--add", "--disable", &p.to_string_lossy(), "bm2"]);
    qemu_io(&p, "qcow2", &["write -P 0x41 0 100k"]);
    check_image(&p);
    let s: Arc<dyn Storage> = Arc::new(diskimg_blockio::FileStorage::open(&p, false).unwrap());
    let dev = diskimg_qcow2::Qcow2Device::open(s, &OpenOptions::new()).unwrap();
    dev.write_at(&[1], 0).unwrap();
    drop(dev);
    let (_, code) = diskimg_testutil::qemu_check_json(&p, "qcow2");
    assert_eq!(code, 0);
}
