//! Hostile and unusual input: qemu-iotests 084 scenarios, sweeps, version 1.0 images.

use diskimg_blockio::{Driver, Error, RepairMode};
use diskimg_testutil::{
    corruption_sweep, qemu_img, qemu_img_ok, qemu_io, qemu_read_raw, read_all, tempdir,
};

use crate::{create, open_bytes};

/// Byte patches: (offset, bytes).
type Pokes<'a> = &'a [(usize, &'a [u8])];

fn poke(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

fn err_text(
    r: diskimg_blockio::Result<std::sync::Arc<dyn diskimg_blockio::BlockDevice>>,
) -> String {
    match r {
        Ok(_) => panic!("opened"),
        Err(e) => e.to_string(),
    }
}

/// Our open error's message is part of qemu-img info's error for the same bytes.
fn assert_same_error(bytes: &[u8]) {
    let ours = err_text(open_bytes(bytes.to_vec()));
    let msg = ours.rsplit("unsupported: ").next().unwrap();
    let theirs = qemu_error(bytes);
    assert!(theirs.contains(msg), "ours: {ours}\ntheirs: {theirs}");
}

/// qemu-img info's error for the same bytes.
fn qemu_error(bytes: &[u8]) -> String {
    let dir = tempdir();
    let p = dir.path().join("t.vdi");
    std::fs::write(&p, bytes).unwrap();
    let out = qemu_img(&["info", "-f", "vdi", &p.to_string_lossy()]);
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn iotest_084_header_bounds() {
    let dir = tempdir();
    let p = dir.path().join("t.vdi");
    qemu_img_ok(&["create", "-q", "-f", "vdi", &p.to_string_lossy(), "64M"]);
    let good = std::fs::read(&p).unwrap();
    let (ds, bs, bii) = (368, 376, 384);

    // Test 1: maximum size; the block map it implies is beyond the limits/file.
    let mut b = good.clone();
    poke(&mut b, ds, b"\x00\x00\x00\xf8\xff\xff\x01\x00");
    poke(&mut b, bii, b"\x80\xff\xff\x1f");
    assert!(open_bytes(b.clone()).is_err());

    // Test 2: 64k more than the maximum.
    poke(&mut b, ds, b"\x00\x00\x01\xf8\xff\xff\x01\x00");
    assert_same_error(&b);
    let e = err_text(open_bytes(b.clone()));
    assert!(
        e.contains(
            "Unsupported VDI image size (size is 0x1fffff8010000, max supported is 0x1fffff8000000)"
        ),
        "{e}"
    );

    // Tests 3-7 with qemu's exact messages.
    let cases: [(Pokes, &str); 4] = [
        (
            &[
                (ds, b"\x00\x00\x00\x04\x00\x00\x00\x00"),
                (bii, b"\x3f\x00\x00\x00"),
            ],
            "unsupported VDI image (disk size 67108864, image bitmap has room for 66060288)",
        ),
        (
            &[
                (ds, b"\x00\x00\x00\x04\x00\x00\x00\x00"),
                (bii, b"\x81\xff\xff\x1f"),
            ],
            "unsupported VDI image (too many blocks 536870785, max is 536870784)",
        ),
        (
            &[(bs, b"\xff\xff\x0f\x00")],
            "unsupported VDI image (block size 1048575 is not 1048576)",
        ),
        (
            &[(bs, b"\x00\x00\x11\x00")],
            "unsupported VDI image (block size 1114112 is not 1048576)",
        ),
    ];
    for (pokes, msg) in cases {
        let mut b = good.clone();
        for (off, v) in pokes {
            poke(&mut b, *off, v);
        }
        let e = err_text(open_bytes(b.clone()));
        assert!(e.contains(msg), "{e}");
        assert!(qemu_error(&b).contains(msg), "qemu: {msg}");
    }

    // Test 5: valid again.
    let dev = open_bytes(good).unwrap();
    assert_eq!(dev.virtual_size(), 64 << 20);
}

#[test]
fn other_header_errors_match_qemu() {
    let dir = tempdir();
    let p = dir.path().join("t.vdi");
    create(&p, 4 << 20, "");
    let good = std::fs::read(&p).unwrap();
    let cases: [(usize, &[u8], &str); 6] = [
        (
            64,
            b"\x00\x00\x00\x00",
            "Image not in VDI format (bad signature 00000000)",
        ),
        (
            68,
            b"\x02\x00\x01\x00",
            "unsupported VDI image (version 1.2)",
        ),
        (
            340,
            b"\x01\x02\x00\x00",
            "unsupported VDI image (unaligned block map offset 0x201)",
        ),
        (
            344,
            b"\x01\x04\x00\x00",
            "unsupported VDI image (unaligned data offset 0x401)",
        ),
        (424, b"\x01", "unsupported VDI image (non-NULL link UUID)"),
        (440, b"\x01", "unsupported VDI image (non-NULL parent UUID)"),
    ];
    for (off, v, msg) in cases {
        let mut b = good.clone();
        poke(&mut b, off, v);
        let e = err_text(open_bytes(b.clone()));
        assert!(e.contains(msg), "{e}");
        assert!(qemu_error(&b).contains(msg), "qemu: {msg}");
    }
    let mut b = good.clone();
    poke(&mut b, 360, b"\x00\x10\x00\x00");
    assert!(err_text(open_bytes(b)).contains("sector size 4096 is not 512"));
    // Truncated block map, truncated header, no header.
    assert!(matches!(
        open_bytes(good[..520].to_vec()),
        Err(Error::Corrupt { .. })
    ));
    assert!(open_bytes(good[..300].to_vec()).is_err());
    assert!(open_bytes(Vec::new()).is_err());
    assert_eq!(
        diskimg_vdi::DRIVER.probe(&diskimg_blockio::MemStorage::from_vec(good[..511].to_vec())),
        0
    );
}

#[test]
fn entries_beyond_file_read_as_zeroes_like_qemu() {
    let dir = tempdir();
    let p = dir.path().join("t.vdi");
    qemu_img_ok(&["create", "-q", "-f", "vdi", &p.to_string_lossy(), "4M"]);
    qemu_io(&p, "vdi", &["write -P 7 0 1M"]);
    let mut b = std::fs::read(&p).unwrap();
    // Block 2 -> data index 3 (beyond the end of the file, still below the block count).
    poke(&mut b, 512 + 8, &3u32.to_le_bytes());
    // Block 3 -> index 0x7000 (too large).
    poke(&mut b, 512 + 12, &0x7000u32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let dev = open_bytes(b).unwrap();
    assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&p, "vdi"));
    let r = dev.check(RepairMode::None).unwrap();
    assert_eq!(r.corruptions, 2, "{:?}", r.messages);
    // Writes to an image with broken entries are refused.
    assert!(dev.write_at(&[1], 0).is_err());
}

/// Rewrites a version 1.1 image (header at 0x200-aligned offsets) as version 1.0.
fn to_v10(v11: &[u8]) -> Vec<u8> {
    let blocks = u32::from_le_bytes(v11[384..388].try_into().unwrap()) as usize;
    let od = u32::from_le_bytes(v11[344..348].try_into().unwrap()) as usize;
    let mut out = vec![0u8; 420];
    out[..64].copy_from_slice(&v11[..64]);
    poke(&mut out, 64, &v11[64..68]);
    poke(&mut out, 68, &0x0001_0000u32.to_le_bytes());
    poke(&mut out, 72, &v11[76..80]); // type
    poke(&mut out, 348, &512u32.to_le_bytes()); // sector size in geometry
    poke(&mut out, 352, &v11[368..376]); // disk size
    poke(&mut out, 360, &v11[376..380]); // block size
    poke(&mut out, 364, &v11[384..388]); // blocks
    poke(&mut out, 368, &v11[388..392]); // allocated
    poke(&mut out, 372, &v11[392..424]); // create + modify uuids
    out.extend_from_slice(&v11[512..512 + blocks * 4]);
    out.extend_from_slice(&v11[od..]);
    out
}

#[test]
fn version_1_0_images_read_and_write() {
    let dir = tempdir();
    let p = dir.path().join("t.vdi");
    qemu_img_ok(&["create", "-q", "-f", "vdi", &p.to_string_lossy(), "5M"]);
    qemu_io(&p, "vdi", &["write -P 0x41 1M 1M", "write -P 0x42 3M 10k"]);
    let expect = qemu_read_raw(&p, "vdi");
    let v10 = to_v10(&std::fs::read(&p).unwrap());
    // qemu refuses version 1.0.
    let q = qemu_error(&v10);
    assert!(q.to_lowercase().contains("unsupported vdi image"), "{q}");
    let s = std::sync::Arc::new(diskimg_blockio::MemStorage::from_vec(v10));
    let st: std::sync::Arc<dyn diskimg_blockio::Storage> = s.clone();
    let dev = diskimg_vdi::DRIVER
        .open(st, &diskimg_blockio::OpenOptions::new())
        .unwrap();
    let mut model = expect.clone();
    assert_eq!(read_all(dev.as_ref()), model);
    dev.write_at(&[9; 3000], (4 << 20) - 1000).unwrap();
    model[(4 << 20) - 1000..(4 << 20) + 2000].fill(9);
    dev.flush().unwrap();
    assert!(
        dev.resize(64 << 20, diskimg_blockio::Preallocation::Off, false)
            .is_err()
    );
    drop(dev);
    let st: std::sync::Arc<dyn diskimg_blockio::Storage> = s;
    let dev = diskimg_vdi::DRIVER
        .open(st, &diskimg_blockio::OpenOptions::new())
        .unwrap();
    assert_eq!(read_all(dev.as_ref()), model);
    assert_eq!(dev.check(RepairMode::None).unwrap().corruptions, 0);
}

#[test]
fn sweeps_do_not_panic() {
    let dir = tempdir();
    let p = dir.path().join("t.vdi");
    qemu_img_ok(&["create", "-q", "-f", "vdi", &p.to_string_lossy(), "3M"]);
    qemu_io(&p, "vdi", &["write -P 1 0 4k", "write -P 2 2M 4k"]);
    let mut b = std::fs::read(&p).unwrap();
    // Keep the fixture small: cut the data blocks short.
    b.truncate(1024 + 8192);
    corruption_sweep(&diskimg_vdi::DRIVER, &b, 97, 1024);
    let v10 = to_v10(&b);
    corruption_sweep(&diskimg_vdi::DRIVER, &v10, 131, 600);
    // Other formats' samples from the corpus are not vdi.
    for name in ["parallels-v1", "empty.bochs", "afl5.img"] {
        let f = diskimg_testutil::corpus_file(name, dir.path());
        let bytes = std::fs::read(f).unwrap();
        assert!(!diskimg_testutil::exercise_driver(
            &diskimg_vdi::DRIVER,
            &bytes
        ));
    }
}
