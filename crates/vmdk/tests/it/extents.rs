//! Hand-made descriptors mixing FLAT (with offset), VMFS, VMFSSPARSE (`COWD`) and ZERO
//! extents, read against qemu.

use diskimg_blockio::{ExtentKind, map_all};
use diskimg_testutil::{pattern, qemu_map_json, qemu_read_raw, read_all, tempdir};

use crate::common::open;

/// A 1 MiB `COWD` extent: 4 KiB grains, one grain table at sector 5, grains 0 and 3.
fn cowd() -> Vec<u8> {
    let mut f = vec![0u8; 512 * 200];
    f[..4].copy_from_slice(b"COWD");
    for (i, v) in [1u32, 3, 2048, 8, 4, 1, 0].iter().enumerate() {
        f[4 + i * 4..8 + i * 4].copy_from_slice(&v.to_le_bytes());
    }
    f[4 * 512..4 * 512 + 4].copy_from_slice(&5u32.to_le_bytes());
    f[5 * 512..5 * 512 + 4].copy_from_slice(&40u32.to_le_bytes());
    f[5 * 512 + 12..5 * 512 + 16].copy_from_slice(&48u32.to_le_bytes());
    f[40 * 512..40 * 512 + 4096].fill(0xaa);
    f[48 * 512..48 * 512 + 4096].copy_from_slice(&pattern(9, 4096));
    f
}

fn write_set(dir: &std::path::Path, lines: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("d.bin"), pattern(5, 2 << 20)).unwrap();
    std::fs::write(dir.join("c.cowd"), cowd()).unwrap();
    let desc = dir.join("mix.vmdk");
    std::fs::write(
        &desc,
        format!("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\n{lines}"),
    )
    .unwrap();
    desc
}

#[test]
fn flat_vmfs_vmfssparse_read_like_qemu() {
    let dir = tempdir();
    let desc = write_set(
        dir.path(),
        "RW 2048 FLAT \"d.bin\" 1024\nRW 2048 VMFS \"d.bin\"\nRW 2048 VMFSSPARSE \"c.cowd\"\n",
    );
    let dev = open(&desc, true).unwrap();
    assert_eq!(dev.virtual_size(), 3 << 20);
    assert_eq!(read_all(dev.as_ref()), qemu_read_raw(&desc, "vmdk"));
    let ours = map_all(dev.as_ref(), 0, 3 << 20).unwrap();
    let theirs = qemu_map_json(&desc, "vmdk");
    for q in theirs.as_array().unwrap() {
        let s = q["start"].as_u64().unwrap();
        let e = ours
            .iter()
            .find(|e| e.offset <= s && s < e.offset + e.len)
            .unwrap();
        match (e.kind, q["offset"].as_u64()) {
            (ExtentKind::Data { offset: Some(o) }, Some(qo)) => {
                assert_eq!(o + (s - e.offset), qo, "at {s}")
            }
            (ExtentKind::Unallocated, None) => assert!(!q["data"].as_bool().unwrap()),
            (k, _) => panic!("at {s}: {k:?} vs {q}"),
        }
    }
}

#[test]
fn zero_extents_read_as_zeroes() {
    // qemu 10 skips ZERO lines (its disk is 1 MiB shorter); the VMDK spec defines them
    // as zero-filled ranges, which is what we do.
    let dir = tempdir();
    let desc = write_set(
        dir.path(),
        "RW 2048 FLAT \"d.bin\" 0\nRW 1024 ZERO\nRW 2048 VMFS \"d.bin\"\n",
    );
    let dev = open(&desc, true).unwrap();
    assert_eq!(dev.virtual_size(), (2 << 20) + (512 << 10));
    let all = read_all(dev.as_ref());
    let d = pattern(5, 2 << 20);
    assert_eq!(&all[..1 << 20], &d[..1 << 20]);
    assert!(
        all[1 << 20..(1 << 20) + (512 << 10)]
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(&all[(1 << 20) + (512 << 10)..], &d[..1 << 20]);
    assert_eq!(
        dev.map(1 << 20, 4096).unwrap().kind,
        ExtentKind::Zero { offset: None }
    );
    let qemu = qemu_read_raw(&desc, "vmdk");
    assert_eq!(qemu.len(), 2 << 20, "qemu skips the ZERO extent");
}
