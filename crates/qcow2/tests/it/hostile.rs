//! Hostile input: qemu-iotests 036/060/080/138/271/287 scenarios and a truncation and
//! bit-flip sweep. Every case is a clean error (or a clean open), never a panic.

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, Driver, Error, MemStorage, OpenOptions, RepairMode, Storage};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{corruption_sweep, qemu_img_ok, qemu_io, tempdir};

fn image(opts: &str, cmds: &[&str]) -> Vec<u8> {
    let dir = tempdir();
    let p = dir.path().join("h.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let ps = p.to_string_lossy().into_owned();
    args.extend([ps.as_str(), "1M"]);
    qemu_img_ok(&args);
    if !cmds.is_empty() {
        qemu_io(&p, "qcow2", cmds);
    }
    std::fs::read(&p).unwrap()
}

fn open(bytes: &[u8], ro: bool) -> diskimg_blockio::Result<Arc<dyn BlockDevice>> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    DRIVER.open(s, &OpenOptions::new().read_only(ro))
}

fn poke(bytes: &[u8], off: usize, val: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[off..off + val.len()].copy_from_slice(val);
    b
}

fn open_err(bytes: &[u8]) -> String {
    match open(bytes, true) {
        Ok(_) => panic!("hostile image opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn iotest_080_header_validation() {
    let img = image("", &["write -P 1 0 64k"]);
    let l1_off = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "header size",
            poke(&img, 100, &0xffff_fff0u32.to_be_bytes()),
        ),
        ("header too short", poke(&img, 100, &96u32.to_be_bytes())),
        (
            "extension length",
            poke(&img, 112 + 4, &0xffff_fff0u32.to_be_bytes()),
        ),
        (
            "refcount table too large",
            poke(&img, 56, &0x00ff_ffffu32.to_be_bytes()),
        ),
        ("no refcount table", poke(&img, 56, &0u32.to_be_bytes())),
        (
            "refcount table offset unaligned",
            poke(&img, 48, &0x10001u64.to_be_bytes()),
        ),
        (
            "refcount table offset huge",
            poke(&img, 48, &0xffff_ffff_ffff_0000u64.to_be_bytes()),
        ),
        (
            "too many snapshots",
            poke(&img, 60, &0x0010_0000u32.to_be_bytes()),
        ),
        (
            "snapshot offset unaligned",
            poke(
                &poke(&img, 60, &1u32.to_be_bytes()),
                64,
                &0x10001u64.to_be_bytes(),
            ),
        ),
        (
            "L1 too large",
            poke(&img, 36, &0x1000_0000u32.to_be_bytes()),
        ),
        ("L1 too small", poke(&img, 36, &0u32.to_be_bytes())),
        (
            "L1 offset unaligned",
            poke(&img, 40, &0x30001u64.to_be_bytes()),
        ),
        (
            "L1 offset huge",
            poke(&img, 40, &0xffff_ffff_ffff_0000u64.to_be_bytes()),
        ),
        ("image too big", poke(&img, 24, &u64::MAX.to_be_bytes())),
        ("cluster bits", poke(&img, 20, &30u32.to_be_bytes())),
        ("version", poke(&img, 4, &4u32.to_be_bytes())),
        ("refcount order", poke(&img, 96, &7u32.to_be_bytes())),
        ("backing offset", poke(&img, 8, &0x20000u64.to_be_bytes())),
        (
            "backing name size",
            poke(
                &poke(&img, 8, &0x200u64.to_be_bytes()),
                16,
                &0xffffu32.to_be_bytes(),
            ),
        ),
        ("compression type", poke(&img, 104, &[5])),
        ("zstd without bit (287)", poke(&img, 104, &[1])),
        ("bit without zstd (287)", poke(&img, 79, &[0x08])),
        ("encryption method", poke(&img, 32, &7u32.to_be_bytes())),
    ];
    for (what, bytes) in cases {
        let e = open_err(&bytes);
        assert!(!e.is_empty(), "{what}");
    }
    // A snapshot table beyond the end of the file reads as zeros, as in qemu: one empty
    // snapshot (no id, no name, no L1 table).
    let beyond = poke(
        &poke(&img, 60, &1u32.to_be_bytes()),
        64,
        &0x7fff_0000_0000u64.to_be_bytes(),
    );
    let snaps = open(&beyond, true).unwrap().info().snapshots;
    assert_eq!(snaps.len(), 1);
    assert_eq!((snaps[0].id.as_str(), snaps[0].name.as_str()), ("", ""));
    // A huge L2 offset in the L1 table opens but fails reads and check cleanly.
    let bad = poke(&img, l1_off, &0x80ff_ffff_ffff_0000u64.to_be_bytes());
    let dev = open(&bad, true).unwrap();
    let mut buf = [0u8; 512];
    assert!(dev.read_at(&mut buf, 0).is_err());
    assert!(dev.map(0, 512).is_err());
    let _ = dev.check(RepairMode::None);
}

#[test]
fn iotest_036_feature_bits() {
    let img = image("", &[]);
    let e = open_err(&poke(&img, 79, &[0x20]));
    assert!(e.contains("Unknown incompatible feature: 20"), "{e}");
    // A feature table naming bit 5 gives its name in the error.
    let pos = img
        .windows(19)
        .position(|w| w == b"extended L2 entries")
        .unwrap();
    let named = poke(&poke(&img, pos - 1, &[5]), 79, &[0x20]);
    let e = open_err(&named);
    assert!(
        e.contains("Unsupported qcow2 feature(s): extended L2 entries"),
        "{e}"
    );
    // Corrupt bit: read-only opens, read-write is refused (iotest 060).
    let corrupt = poke(&img, 79, &[0x02]);
    assert!(open(&corrupt, true).is_ok());
    let e = open(&corrupt, false).unwrap_err().to_string();
    assert!(e.contains("corrupt"), "{e}");
    // Data file bit without a data file name.
    let e = open_err(&poke(&img, 79, &[0x04]));
    assert!(e.contains("data-file"), "{e}");
}

#[test]
fn iotest_138_data_offset_beyond_eof_and_271_bad_subclusters() {
    let img = image("cluster_size=512", &["write -P 1 0 512"]);
    let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(img[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let far = poke(
        &img,
        l2,
        &(0x8000_0000_0000_0000u64 | (1u64 << 41)).to_be_bytes(),
    );
    let dev = open(&far, true).unwrap();
    let r = dev.check(RepairMode::None).unwrap();
    assert!(r.corruptions > 0, "{r:?}");
    let mut b = [0u8; 512];
    // Reading past the end of the file yields zeroes, as qemu does.
    dev.read_at(&mut b, 0).unwrap();

    let img = image("extended_l2=on,cluster_size=16k", &["write -P 1 0 4k"]);
    let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(img[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    // Subcluster 0 both allocated and zero.
    let both = poke(&img, l2 + 8, &0x0000_0001_0000_0001u64.to_be_bytes());
    let dev = open(&both, true).unwrap();
    assert!(matches!(dev.read_at(&mut b, 0), Err(Error::Corrupt { .. })));
    // Compressed cluster with a non-zero bitmap.
    let comp = poke(
        &img,
        l2,
        &(0x4000_0000_0000_0000u64 | 0x10000).to_be_bytes(),
    );
    let dev = open(&comp, true).unwrap();
    assert!(dev.read_at(&mut b, 0).is_err());
}

#[test]
fn encrypted_images_are_refused() {
    let dir = tempdir();
    let p = dir.path().join("luks.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=pw",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &p.to_string_lossy(),
        "1M",
    ]);
    let e = open(&std::fs::read(&p).unwrap(), true).unwrap_err();
    assert!(matches!(e, Error::Key(_)), "{e}");
}

#[test]
fn truncation_and_bit_flip_sweep() {
    let dir = tempdir();
    let p = dir.path().join("fx.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        &p.to_string_lossy(),
        "64k",
    ]);
    qemu_io(
        &p,
        "qcow2",
        &["write -P 1 0 2k", "write -c -P 2 4k 512", "write -z 8k 1k"],
    );
    qemu_img_ok(&["snapshot", "-c", "s", &p.to_string_lossy()]);
    qemu_io(&p, "qcow2", &["write -P 3 1k 2k"]);
    let bytes = std::fs::read(&p).unwrap();
    corruption_sweep(&DRIVER, &bytes, 512, 512);
    let ext = image(
        "extended_l2=on,cluster_size=16k,compression_type=zstd",
        &["write -P 1 0 5k", "write -c -P 2 16k 16k"],
    );
    corruption_sweep(&DRIVER, &ext, 4096, 256);
}

#[test]
fn iotest_060_write_into_metadata_marks_corrupt() {
    let dir = tempdir();
    let p = dir.path().join("ov.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &p.to_string_lossy(), "1M"]);
    qemu_io(&p, "qcow2", &["write -P 1 0 64k"]);
    let img = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap());
    let l2 = (u64::from_be_bytes(img[l1 as usize..l1 as usize + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00) as usize;
    // The data cluster entry now points at the L1 table.
    std::fs::write(
        &p,
        poke(&img, l2, &(0x8000_0000_0000_0000u64 | l1).to_be_bytes()),
    )
    .unwrap();
    let dev = crate::open(&p, false);
    assert!(matches!(
        dev.write_at(&[7u8; 512], 0),
        Err(Error::Corrupt { .. })
    ));
    drop(dev);
    let q = diskimg_testutil::qemu_info_json(&p, "qcow2");
    assert_eq!(q["format-specific"]["data"]["corrupt"], true);
    // The L1 table was not overwritten; read-only opens still work.
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        after[l1 as usize..l1 as usize + 512],
        img[l1 as usize..l1 as usize + 512]
    );
    assert!(open(&after, true).is_ok());
    assert!(open(&after, false).is_err());
}

fn fixture_with_everything() -> Vec<u8> {
    let dir = tempdir();
    let p = dir.path().join("all.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,refcount_bits=8",
        &p.to_string_lossy(),
        "256k",
    ]);
    qemu_io(
        &p,
        "qcow2",
        &[
            "write -P 1 0 20k",
            "write -c -P 2 64k 4k",
            "write -z 80k 8k",
        ],
    );
    qemu_img_ok(&["snapshot", "-c", "s1", &p.to_string_lossy()]);
    qemu_io(&p, "qcow2", &["write -P 3 4k 8k", "discard 16k 4k"]);
    std::fs::read(&p).unwrap()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 200, ..Default::default() })]
    /// Random 8-byte corruptions anywhere in the file (tables, refcount blocks, snapshot
    /// table): opening, reading, mapping, writing, discarding and repairing never panic.
    #[test]
    fn random_corruption_read_write_repair_never_panics(
        pokes in proptest::collection::vec((0usize..1 << 20, proptest::prelude::any::<u64>()), 1..4),
        ops in proptest::collection::vec((0u64..256 << 10, 1u64..20_000, 0u8..4), 1..6),
    ) {
        static FIXTURE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let mut img = FIXTURE.get_or_init(fixture_with_everything).clone();
        for (pos, v) in pokes {
            let pos = (pos % img.len()) & !7;
            if pos + 8 <= img.len() {
                img[pos..pos + 8].copy_from_slice(&v.to_be_bytes());
            }
        }
        diskimg_testutil::exercise_driver(&DRIVER, &img);
        if let Ok(dev) = open(&img, false) {
            let size = dev.virtual_size();
            for (o, l, k) in ops {
                if size == 0 { break; }
                let o = o % size;
                let l = l.min(size - o);
                let _ = match k {
                    0 => dev.write_at(&vec![9u8; l as usize], o),
                    1 => dev.write_zeroes(o, l, Default::default()),
                    2 => dev.discard(o, l),
                    _ => dev.write_compressed(&vec![5u8; 4096], o / 4096 * 4096),
                };
            }
            let _ = dev.flush();
            let _ = dev.check(RepairMode::All);
        }
    }
}

/// The error taxonomy on qcow2 (the facade's `tests/it/taxonomy.rs` covers the other
/// formats): a foreign or truncated file is `NotThisFormat` at offset 0, a damaged
/// header field `Corrupt` at that field's offset, a bad create option `InvalidArgument`;
/// the messages stay qemu's.
#[test]
fn taxonomy_foreign_damaged_and_bad_requests() {
    let img = image("", &[]);
    let mut foreign = img.clone();
    foreign[..4].copy_from_slice(b"VMDK");
    for bytes in [foreign, img[..64].to_vec()] {
        let e = open(&bytes, true).unwrap_err();
        assert!(
            matches!(e, Error::NotThisFormat { offset: 0, .. }),
            "want NotThisFormat at 0, got {e:?}"
        );
        assert_eq!(e.to_string(), "Image is not in qcow2 format");
    }
    // refcount_table_clusters (header bytes 56-59) = 0.
    let mut no_reftable = img.clone();
    no_reftable[56..60].fill(0);
    let e = open(&no_reftable, true).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Corrupt {
                offset: Some(56),
                ..
            }
        ),
        "want Corrupt at 56, got {e:?}"
    );
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = diskimg_blockio::CreateRequest::new(
        1 << 20,
        diskimg_blockio::OptionList::parse("cluster_size=1000").unwrap(),
    );
    let e = DRIVER.create(s, &mut req).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "Cluster size must be a power of two between 512 and 2048k"
    );
}
