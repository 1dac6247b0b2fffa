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
            (ExtentKind::Unallocated { .. }, None) => assert!(!q["data"].as_bool().unwrap()),
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

/// A 1 MiB seSparse extent built from qemu's layout: const header, volatile header at
/// sector 1, grain directory at 2, grain tables from 3, grains from 67.
pub(crate) fn sesparse() -> Vec<u8> {
    let mut f = vec![0u8; 512 * (67 + 16)];
    let put =
        |f: &mut Vec<u8>, off: usize, v: u64| f[off..off + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut f, 0, 0xcafe_babe);
    put(&mut f, 8, 0x0000_0002_0000_0001);
    put(&mut f, 16, 2048); // capacity
    put(&mut f, 24, 8); // grain size
    put(&mut f, 32, 64); // grain table size
    put(&mut f, 80, 1); // volatile header
    put(&mut f, 88, 1);
    put(&mut f, 128, 2); // grain directory
    put(&mut f, 136, 1);
    put(&mut f, 144, 3); // grain tables
    put(&mut f, 152, 64);
    put(&mut f, 192, 67); // grains
    put(&mut f, 200, 16);
    put(&mut f, 512, 0xcafe_cafe);
    put(&mut f, 1024, 0x1000_0000_0000_0000);
    let gt = 3 * 512;
    put(&mut f, gt, 0x3000_0000_0000_0000); // grain 0 -> cluster 0
    put(&mut f, gt + 5 * 8, 0x3000_0000_0000_0000 | (1 << 48)); // grain 5 -> cluster 1
    put(&mut f, gt + 7 * 8, 0x2000_0000_0000_0000); // zero
    put(&mut f, gt + 9 * 8, 0x1000_0000_0000_0000); // unmapped
    f[67 * 512..67 * 512 + 4096].copy_from_slice(&pattern(11, 4096));
    f[75 * 512..75 * 512 + 4096].copy_from_slice(&pattern(12, 4096));
    f
}

#[test]
fn sesparse_reads_like_qemu() {
    let dir = tempdir();
    std::fs::write(dir.path().join("se.vmdk"), sesparse()).unwrap();
    let desc = dir.path().join("d.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"seSparse\"\n\nRW 2048 SESPARSE \"se.vmdk\"\n",
    )
    .unwrap();
    let dev = open(&desc, true).unwrap();
    let ours = read_all(dev.as_ref());
    // qemu 10 registers an SESPARSE extent twice (its disk is 2 MiB, the second half
    // repeating the first); we compare against the first copy.
    let mut q = qemu_read_raw(&desc, "vmdk");
    assert_eq!(q.len(), 2 << 20);
    assert_eq!(q[..1 << 20], q[1 << 20..]);
    q.truncate(1 << 20);
    let diff = ours.iter().zip(&q).position(|(a, b)| a != b);
    assert!(
        diff.is_none() && ours.len() == q.len(),
        "first difference at {diff:?} ({} vs {})",
        ours.len(),
        q.len()
    );
    assert_eq!(&ours[5 * 4096..6 * 4096], &pattern(12, 4096)[..]);
    assert_eq!(
        dev.map(7 * 4096, 4096).unwrap().kind,
        ExtentKind::Zero { offset: None }
    );
    assert_eq!(
        dev.map(9 * 4096, 4096).unwrap().kind,
        ExtentKind::Zero { offset: None }
    );
    assert_eq!(
        dev.map(5 * 4096, 4096).unwrap().kind,
        ExtentKind::Data {
            offset: Some(75 * 512)
        }
    );
    let theirs = qemu_map_json(&desc, "vmdk");
    let q5 = theirs
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["start"] == 5 * 4096)
        .unwrap();
    assert_eq!(q5["offset"].as_u64(), Some(75 * 512));
    // qemu: "No write support for seSparse images available".
    let e = open(&desc, false).unwrap_err().to_string();
    assert!(e.contains("No write support"), "{e}");
    diskimg_testutil::corruption_sweep(&diskimg_vmdk::DRIVER, &sesparse()[..2048], 512, 0);
}
