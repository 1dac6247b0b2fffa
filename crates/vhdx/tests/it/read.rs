//! Reading images qemu and other tools wrote, byte-identical to qemu's reading.

use diskimg_blockio::RepairMode;
use diskimg_testutil::{corpus_file, qemu_create, qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::common::{assert_reads_like_raw, open, qemu_to_raw};

#[test]
fn hyperv_dynamic_sample_reads_like_qemu() {
    let dir = tempdir();
    let img = corpus_file("iotest-dynamic-1G.vhdx", dir.path());
    let raw = qemu_to_raw(&img, dir.path(), "r.raw");
    let dev = open(&img, true);
    assert_eq!(dev.info().cluster_size, Some(32 << 20));
    assert_reads_like_raw(dev.as_ref(), &raw);
    let mut b = vec![0u8; 1 << 20];
    dev.read_at(&mut b, 32 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0xa5));
    dev.read_at(&mut b, 65 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0x96));
    let r = dev.check(RepairMode::None).unwrap();
    assert_eq!(r.corruptions, 0, "{r:?}");
}

#[test]
fn disk2vhd_sample_reads_like_qemu() {
    let dir = tempdir();
    let img = corpus_file("test-disk2vhd.vhdx", dir.path());
    let raw = qemu_to_raw(&img, dir.path(), "r.raw");
    let dev = open(&img, true);
    assert_reads_like_raw(dev.as_ref(), &raw);
}

#[test]
fn dirty_log_replayed_in_memory_read_only() {
    let dir = tempdir();
    let img = corpus_file("iotest-dirtylog-10G-4M.vhdx", dir.path());
    let before = std::fs::read(&img).unwrap();
    // qemu refuses the read-only open.
    assert!(!qemu_img(&["info", img.to_str().unwrap()]).status.success());
    let dev = open(&img, true);
    assert!(dev.info().dirty);
    let mut b = vec![0u8; 18 << 20];
    dev.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0xa5));
    let r = dev.check(RepairMode::None).unwrap();
    assert_eq!(r.corruptions, 1);
    drop(dev);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "read-only open modified the file"
    );
    // qemu's replay (check -r all) on a copy is the oracle for the whole disk.
    let copy = dir.path().join("copy.vhdx");
    std::fs::copy(&img, &copy).unwrap();
    let out = qemu_img(&[
        "check",
        "-r",
        "all",
        "--output=json",
        copy.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["corruptions-fixed"], 1, "{v}");
    let raw = qemu_to_raw(&copy, dir.path(), "r.raw");
    let dev = open(&img, true);
    assert_reads_like_raw(dev.as_ref(), &raw);
}

#[test]
fn dirty_log_replayed_to_disk_read_write() {
    let dir = tempdir();
    let img = corpus_file("iotest-dirtylog-10G-4M.vhdx", dir.path());
    let dev = open(&img, false);
    let r = dev.check(RepairMode::All).unwrap();
    assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1));
    drop(dev);
    // Now qemu opens it read-only and sees the data; check is clean.
    diskimg_testutil::assert_qemu_check_clean(&img, "vhdx");
    qemu_io(&img, "vhdx", &["read -P 0xa5 0 18M"]);
}

#[test]
fn qemu_created_images_read_identical() {
    let dir = tempdir();
    for (i, opts) in [
        "subformat=dynamic",
        "subformat=fixed",
        "block_size=1M",
        "block_size=2M,block_state_zero=off",
        "subformat=fixed,block_size=4M,log_size=2M",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("q{i}.vhdx"));
        qemu_create(&img, "vhdx", opts, Some("24M"));
        qemu_io(
            &img,
            "vhdx",
            &[
                "write -P 0x11 0 1M",
                "write -P 0x22 3M 4097",
                "write -P 0x33 9M 3M",
                "write -z 10M 64k",
                "write -P 0x44 23M 512",
            ],
        );
        let raw = qemu_to_raw(&img, dir.path(), &format!("q{i}.raw"));
        let dev = open(&img, true);
        assert_reads_like_raw(dev.as_ref(), &raw);
        assert_eq!(
            diskimg_testutil::read_all(dev.as_ref()),
            std::fs::read(&raw).unwrap()
        );
    }
}

#[test]
fn large_sparse_qemu_image() {
    let dir = tempdir();
    let img = dir.path().join("big.vhdx");
    qemu_img_ok(&["create", "-f", "vhdx", img.to_str().unwrap(), "4T"]);
    qemu_io(&img, "vhdx", &["write -P 0x5a 3T 64k"]);
    let dev = open(&img, true);
    assert_eq!(dev.virtual_size(), 4 << 40);
    let mut b = vec![0u8; 65536];
    dev.read_at(&mut b, 3 << 40).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    dev.read_at(&mut b, 1 << 40).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn check_matches_qemu_on_truncated_image() {
    let dir = tempdir();
    let img = dir.path().join("t.vhdx");
    qemu_create(&img, "vhdx", "block_size=1M", Some("8M"));
    qemu_io(&img, "vhdx", &["write 1M 2M", "write 6M 1M"]);
    let len = std::fs::metadata(&img).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(len - (1 << 20) - 4096).unwrap();
    drop(f);
    let (v, code) = diskimg_testutil::qemu_check_json(&img, "vhdx");
    assert_eq!(code, 2);
    // A normal open refuses the image with qemu's message; a check open reports it.
    let q = diskimg_testutil::qemu_img(&["info", img.to_str().unwrap()]);
    let qmsg = String::from_utf8_lossy(&q.stderr).into_owned();
    let e = crate::common::try_open(&img, true).unwrap_err().to_string();
    assert!(qmsg.contains(&e), "qemu: {qmsg} ours: {e}");
    let dev = crate::common::open_for_check(&img, true).unwrap();
    let r = dev.check(RepairMode::None).unwrap();
    assert_eq!(v["corruptions"], r.corruptions, "{r:?}");
    assert!(
        r.messages
            .iter()
            .any(|m| m.contains("Image has probably been truncated"))
    );
    let clean = dir.path().join("c.vhdx");
    qemu_img_ok(&["create", "-f", "vhdx", clean.to_str().unwrap(), "8M"]);
    assert_eq!(
        open(&clean, true).check(RepairMode::None).unwrap(),
        Default::default()
    );
}

/// qemu-iotests 064: read/write on the Hyper-V created image.
#[test]
fn hyperv_sample_writes() {
    let dir = tempdir();
    let img = corpus_file("iotest-dynamic-1G.vhdx", dir.path());
    let dev = open(&img, false);
    dev.write_at(&[0x5b; 1 << 20], 30 << 20).unwrap();
    dev.write_at(&[0x5c; 4096], 500 << 20).unwrap();
    drop(dev);
    diskimg_testutil::assert_qemu_check_clean(&img, "vhdx");
    qemu_io(
        &img,
        "vhdx",
        &[
            "read -P 0xa5 0 30M",
            "read -P 0x5b 30M 1M",
            "read -P 0xa5 31M 2M",
            "read -P 0x96 33M 33M",
            "read -P 0x5c 500M 4k",
            "read -P 0 501M 100M",
        ],
    );
}
