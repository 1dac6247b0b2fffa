//! Metadata protection (issue 15.1 and 15.3): truncated sparse files refused as qemu
//! refuses them, overlapping table layouts refused at open, and no data write — through
//! an existing grain table entry or a new grain — ever landing on the header, the
//! descriptor, a grain directory or a grain table. Each refusal is a clean
//! [`Error::Corrupt`] (or qemu's message) with the metadata bytes left as they were.

use std::path::Path;

use diskimg_blockio::{Error, ExtentKind};
use diskimg_testutil::{qemu_create, qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::common::{open, p};

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A qemu-made 1 MiB monolithicSparse image with grain 0 written, and its layout:
/// (descriptor sector, rgd sector, gd sector, primary gt sector, redundant gt sector,
/// grain offset in sectors).
fn sparse_image(path: &Path) -> [u64; 6] {
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(path), "1M"]);
    qemu_io(path, "vmdk", &["write -P 0x5a 0 64k"]);
    let b = std::fs::read(path).unwrap();
    let (rgd, gd) = (le64(&b, 48), le64(&b, 56));
    let gt = u64::from(le32(&b, gd as usize * 512));
    let rgt = u64::from(le32(&b, rgd as usize * 512));
    [le64(&b, 28), rgd, gd, gt, rgt, le64(&b, 64)]
}

fn patch(path: &Path, at: u64, val: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize..at as usize + val.len()].copy_from_slice(val);
    std::fs::write(path, b).unwrap();
}

fn head(path: &Path, len: u64) -> Vec<u8> {
    std::fs::read(path).unwrap()[..len as usize].to_vec()
}

#[test]
fn truncated_sparse_is_refused_like_qemu() {
    // The reproduction: 100 GiB, cut to 10 MiB inside its grain tables.
    let dir = tempdir();
    let img = dir.path().join("t.vmdk");
    qemu_create(&img, "vmdk", "subformat=monolithicSparse", Some("100G"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(10 << 20)
        .unwrap();
    let before = std::fs::read(&img).unwrap();
    let want = "File truncated, expecting at least 13172736 bytes";
    let q = qemu_img(&["info", &p(&img)]);
    assert!(
        String::from_utf8_lossy(&q.stderr).contains(want),
        "qemu: {q:?}"
    );
    for ro in [true, false] {
        let e = open(&img, ro).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn data_writes_never_land_on_metadata() {
    let dir = tempdir();
    let img = dir.path().join("g.vmdk");
    let [desc, rgd, gd, gt, rgt, _] = sparse_image(&img);
    for target in [desc, rgd, gd, gt, rgt, gt + 2] {
        sparse_image(&img);
        // Grain 0 of both grain tables now points at a metadata sector.
        patch(&img, gt * 512, &(target as u32).to_le_bytes());
        patch(&img, rgt * 512, &(target as u32).to_le_bytes());
        let meta = head(&img, 64 << 10);
        let dev = open(&img, false).unwrap();
        let e = dev.write_at(&[0xee; 4096], 0).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "sector {target}: {e}");
        let e = dev.write_at(&[0xee; 512], 512).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "sector {target}: {e}");
        // A grain elsewhere still works, placed after every table.
        dev.write_at(&[0x77; 512], 512 << 10).unwrap();
        match dev.map(512 << 10, 512).unwrap().kind {
            ExtentKind::Data { offset: Some(o) } => assert!(o >= 64 << 10, "{o:#x}"),
            k => panic!("{k:?}"),
        }
        drop(dev);
        let after = head(&img, 64 << 10);
        // Only the grain table entry of the new grain (and the descriptor's CID) changed.
        let changed: Vec<usize> = (0..meta.len()).filter(|&i| meta[i] != after[i]).collect();
        let gte = |t: u64| (t * 512 + 8 * 4) as usize..(t * 512 + 8 * 4 + 4) as usize;
        let cid = desc as usize * 512..(desc as usize + 20) * 512;
        assert!(
            changed
                .iter()
                .all(|i| gte(gt).contains(i) || gte(rgt).contains(i) || cid.contains(i)),
            "sector {target}: bytes changed at {changed:?}"
        );
    }
}

#[test]
fn overlapping_tables_are_refused_at_open() {
    let dir = tempdir();
    let img = dir.path().join("o.vmdk");
    let [desc, rgd, gd, gt, _, _] = sparse_image(&img);
    // Grain table over the descriptor, the directories; both directories naming one
    // table; the directory over the descriptor.
    let cases: [(u64, u64); 5] = [
        (gd * 512, desc + 3),
        (gd * 512, rgd),
        (rgd * 512, gd),
        (rgd * 512, gt),
        (56, desc + 1),
    ];
    for (at, val) in cases {
        sparse_image(&img);
        if at == 56 {
            patch(&img, at, &val.to_le_bytes());
        } else {
            patch(&img, at, &(val as u32).to_le_bytes());
        }
        let before = std::fs::read(&img).unwrap();
        for ro in [true, false] {
            let e = open(&img, ro).unwrap_err();
            assert!(matches!(e, Error::Corrupt { .. }), "{at}={val}: {e}");
        }
        assert!(std::fs::read(&img).unwrap() == before);
    }
}

/// A 1 MiB `COWD` extent: 4 KiB grains, a 4-sector header, the directory at sector 4,
/// grain tables (16 KiB each) at sectors 5 and `second` (maybe past the end of the file),
/// grain 0 at sector 40.
fn cowd(second: u32) -> Vec<u8> {
    let mut f = vec![0u8; 512 * 200];
    f[..4].copy_from_slice(b"COWD");
    for (i, v) in [1u32, 3, 2048 * 8, 8, 4, 2, 0].iter().enumerate() {
        f[4 + i * 4..8 + i * 4].copy_from_slice(&v.to_le_bytes());
    }
    f[4 * 512..4 * 512 + 4].copy_from_slice(&5u32.to_le_bytes());
    f[4 * 512 + 4..4 * 512 + 8].copy_from_slice(&second.to_le_bytes());
    f[5 * 512..5 * 512 + 4].copy_from_slice(&40u32.to_le_bytes());
    f
}

fn cowd_desc(dir: &Path, extent: &[u8]) -> std::path::PathBuf {
    std::fs::write(dir.join("c.cowd"), extent).unwrap();
    let desc = dir.join("c.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfsSparse\"\nRW 16384 VMFSSPARSE \"c.cowd\"\n",
    )
    .unwrap();
    desc
}

#[test]
fn cowd_extents_are_guarded_too() {
    let dir = tempdir();
    // A grain table entry pointing at the header, the directory, the table itself.
    for target in [1u32, 4, 5] {
        let mut f = cowd(60);
        f[5 * 512..5 * 512 + 4].copy_from_slice(&target.to_le_bytes());
        let desc = cowd_desc(dir.path(), &f);
        let dev = open(&desc, false).unwrap();
        let e = dev.write_at(&[1; 512], 0).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{target}: {e}");
        drop(dev);
        assert!(std::fs::read(dir.path().join("c.cowd")).unwrap()[..100 * 512] == f[..100 * 512]);
    }
    // The second grain table lies past the end of the file: a new grain in the first
    // table goes after it, not over it.
    let desc = cowd_desc(dir.path(), &cowd(300));
    let dev = open(&desc, false).unwrap();
    dev.write_at(&[2; 4096], 4096).unwrap();
    match dev.map(4096, 4096).unwrap().kind {
        ExtentKind::Data { offset: Some(o) } => assert!(o >= (300 + 32) * 512, "{o:#x}"),
        k => panic!("{k:?}"),
    }
    // A table overlapping the header is refused at open.
    let desc = cowd_desc(dir.path(), &cowd(2));
    assert!(matches!(open(&desc, true), Err(Error::Corrupt { .. })));
}

#[test]
fn flat_extents_cannot_alias_metadata() {
    let dir = tempdir();
    let sparse = dir.path().join("s.vmdk");
    sparse_image(&sparse);
    let desc = dir.path().join("d.vmdk");
    let text = |lines: &str| {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n{lines}"
        )
    };
    for lines in [
        // The descriptor file itself as data.
        "RW 8 FLAT \"d.vmdk\" 0\n",
        // A sparse extent's grain directory through a flat alias.
        "RW 2048 SPARSE \"s.vmdk\"\nRW 64 FLAT \"s.vmdk\" 0\n",
    ] {
        std::fs::write(&desc, text(lines)).unwrap();
        let before = std::fs::read(&sparse).unwrap();
        let e = open(&desc, false).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{lines}: {e}");
        assert!(std::fs::read(&sparse).unwrap() == before);
    }
    // Data of a flat extent after a sparse file's grains is not metadata.
    std::fs::write(
        &desc,
        text("RW 2048 SPARSE \"s.vmdk\"\nRW 8 FLAT \"s.vmdk\" 100000\n"),
    )
    .unwrap();
    assert!(open(&desc, true).is_ok());
}
