//! Hostile input: truncation/bit-flip sweeps, qemu-iotests 059 scenarios, extent
//! names that escape the image directory.

use diskimg_blockio::bytes::WriteBytes;
use diskimg_testutil::{corpus_file, corruption_sweep, qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::common::{create, open, p};

#[test]
fn sweeps_do_not_panic() {
    let dir = tempdir();
    let img = dir.path().join("s.vmdk");
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&img), "1M"]);
    qemu_io(&img, "vmdk", &["write -P 1 0 64k", "write -P 2 512k 4k"]);
    let bytes = std::fs::read(&img).unwrap();
    corruption_sweep(&diskimg_vmdk::DRIVER, &bytes, 4096, 600);
    let st = dir.path().join("st.vmdk");
    qemu_img_ok(&[
        "convert",
        "-f",
        "vmdk",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        &p(&img),
        &p(&st),
    ]);
    corruption_sweep(
        &diskimg_vmdk::DRIVER,
        &std::fs::read(&st).unwrap(),
        8192,
        96,
    );
    let v3 = corpus_file("iotest-version3.vmdk", dir.path());
    let v3b = std::fs::read(&v3).unwrap();
    corruption_sweep(&diskimg_vmdk::DRIVER, &v3b[v3b.len() - 1536..], 512, 0);
    let afl = corpus_file("afl9.vmdk", dir.path());
    corruption_sweep(
        &diskimg_vmdk::DRIVER,
        &std::fs::read(&afl).unwrap(),
        65536,
        96,
    );
    for text in [
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"x\" 0\n",
        "version=1\nRW 1 ZERO\n",
    ] {
        corruption_sweep(&diskimg_vmdk::DRIVER, text.as_bytes(), 7, text.len());
    }
}

fn patch(path: &std::path::Path, off: usize, val: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    assert!(b.put(off, val));
    std::fs::write(path, b).unwrap();
}

fn both_fail(path: &std::path::Path, qemu_msg: &str, ours: &str) {
    let out = qemu_img(&["info", &p(path)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(qemu_msg),
        "qemu: {err}"
    );
    let e = open(path, true).unwrap_err().to_string();
    assert!(e.contains(ours), "ours: {e}");
}

#[test]
fn iotest_059_scenarios() {
    let dir = tempdir();
    let img = dir.path().join("t.vmdk");
    // Invalid grain size.
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&img), "64M"]);
    patch(&img, 20, &0x400000u64.to_le_bytes());
    let e = open(&img, true).unwrap_err().to_string();
    assert!(e.contains("granularity") || e.contains("L1"), "{e}");
    assert!(!qemu_img(&["info", &p(&img)]).status.success());
    // L2 table too big.
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&img), "64M"]);
    patch(&img, 44, &1024u32.to_le_bytes());
    both_fail(&img, "L2 table size too big", "L2 table size too big");
    // Huge L1 (absurd capacity).
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&img), "64M"]);
    patch(&img, 12, &u64::MAX.to_le_bytes());
    patch(&img, 44, &1u32.to_le_bytes());
    patch(&img, 20, &1u64.to_le_bytes());
    both_fail(&img, "L1 size too big", "L1 size too big");
    // Malformed extent lines.
    let desc = dir.path().join("d.vmdk");
    std::fs::write(dir.path().join("dummy.vmdk"), vec![0u8; 512]).unwrap();
    for line in [
        "RW 12582912 FLAT \"dummy.vmdk\"",
        "RW 12582912 VMFS \"dummy.vmdk\" 1",
    ] {
        std::fs::write(&desc, format!("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n{line}\n")).unwrap();
        both_fail(&desc, "Invalid extent line", "Invalid extent line");
    }
    // Truncated sparse file: opens, reads beyond EOF give zeroes like qemu.
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&img), "64M"]);
    qemu_io(&img, "vmdk", &["write -P 7 0 1M"]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(300 << 10).unwrap();
    let dev = open(&img, true).unwrap();
    assert_eq!(
        diskimg_testutil::read_all(dev.as_ref()),
        diskimg_testutil::qemu_read_raw(&img, "vmdk")
    );
    let r = dev.check(diskimg_blockio::RepairMode::None).unwrap();
    assert_eq!(r.corruptions, 1, "{r:?}");
    let (_, code) = (0, qemu_img(&["check", &p(&img)]).status.code());
    assert_ne!(code, Some(0));
}

#[test]
fn extents_cannot_escape_the_directory() {
    let dir = tempdir();
    let desc = dir.path().join("evil.vmdk");
    for name in ["/etc/passwd", "../evil-flat.vmdk", "sub/x.vmdk"] {
        std::fs::write(&desc, format!("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"{name}\" 0\n")).unwrap();
        let e = open(&desc, true).unwrap_err();
        assert!(
            matches!(e, diskimg_blockio::Error::BackingDenied { .. }),
            "{name}: {e}"
        );
    }
    // The default OpenOptions deny every extent file.
    create(
        &dir.path().join("f.vmdk"),
        1 << 20,
        "subformat=monolithicFlat",
    )
    .unwrap();
    let s: std::sync::Arc<dyn diskimg_blockio::Storage> = std::sync::Arc::new(
        diskimg_blockio::FileStorage::open(dir.path().join("f.vmdk"), true).unwrap(),
    );
    use diskimg_blockio::Driver;
    assert!(
        diskimg_vmdk::DRIVER
            .open(s, &diskimg_blockio::OpenOptions::new().read_only(true))
            .is_err()
    );
}

#[test]
fn corrupted_grain_tables_do_not_panic() {
    let dir = tempdir();
    let img = dir.path().join("g.vmdk");
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&img), "1M"]);
    qemu_io(&img, "vmdk", &["write -P 1 0 64k", "write -P 2 512k 4k"]);
    let bytes = std::fs::read(&img).unwrap();
    // Grain directories and tables live between sector 21 and the first grain.
    for off in (21 * 512..31 * 512).step_by(3) {
        for v in [0xffu8, 0x01, 0x80] {
            let mut b = bytes.clone();
            b[off] ^= v;
            diskimg_testutil::exercise_driver(&diskimg_vmdk::DRIVER, &b);
        }
    }
    // A compressed image with 1 GiB grains is refused by the limits, not allocated.
    let mut b = bytes.clone();
    b[8..12].copy_from_slice(&(0x30003u32).to_le_bytes());
    b[20..28].copy_from_slice(&(0x20_0000u64).to_le_bytes());
    b[77..79].copy_from_slice(&1u16.to_le_bytes());
    let s: std::sync::Arc<dyn diskimg_blockio::Storage> =
        std::sync::Arc::new(diskimg_blockio::MemStorage::from_vec(b));
    use diskimg_blockio::Driver;
    let e = diskimg_vmdk::DRIVER
        .open(s, &diskimg_blockio::OpenOptions::new().read_only(true))
        .unwrap_err();
    assert!(
        matches!(e, diskimg_blockio::Error::LimitExceeded { .. }),
        "{e}"
    );
}

mod mutations {
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn seeds() -> &'static [Vec<u8>; 2] {
        static S: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
        S.get_or_init(|| {
            let dir = diskimg_testutil::tempdir();
            let img = dir.path().join("s.vmdk");
            let st = dir.path().join("st.vmdk");
            let p = |x: &std::path::Path| x.to_string_lossy().into_owned();
            diskimg_testutil::qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&img), "1M"]);
            diskimg_testutil::qemu_io(&img, "vmdk", &["write -P 3 0 128k"]);
            diskimg_testutil::qemu_img_ok(&[
                "convert",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                &p(&img),
                &p(&st),
            ]);
            [std::fs::read(&img).unwrap(), std::fs::read(&st).unwrap()]
        })
    }

    const WORDS: &[&str] = &[
        "RW",
        "RDONLY",
        "FLAT",
        "SPARSE",
        "ZERO",
        "VMFS",
        "VMFSSPARSE",
        "SESPARSE",
        "\"x\"",
        "\"\"",
        "0",
        "-1",
        "99999999999999999999",
        "18446744073709551615",
        "createType=\"monolithicFlat\"",
        "version=1",
        "CID=",
        "parentCID=zz",
        "parentFileNameHint=\"../p\"",
        "ddb.x = \"",
        "\n",
        "\r\n",
        " ",
        "#",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn mutated_images(which in 0usize..2, muts in proptest::collection::vec((0usize..40_000, any::<u8>()), 1..8)) {
            let mut b = seeds()[which].clone();
            for (off, v) in muts {
                let i = off % b.len();
                b[i] = v;
            }
            diskimg_testutil::exercise_driver(&diskimg_vmdk::DRIVER, &b);
        }

        #[test]
        fn random_descriptors(words in proptest::collection::vec(0usize..WORDS.len(), 0..40)) {
            let text: String = std::iter::once("version=1\n").chain(words.iter().map(|&i| WORDS[i])).collect::<Vec<_>>().join(" ");
            let _ = diskimg_vmdk::parse_descriptor(&text);
            diskimg_testutil::exercise_driver(&diskimg_vmdk::DRIVER, text.as_bytes());
        }
    }
}
