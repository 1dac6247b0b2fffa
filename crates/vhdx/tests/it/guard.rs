//! Metadata protection (issue 15.3 and its locator goal): overlapping regions refused
//! with qemu's message, BAT entries aimed at the log, a region or a sector bitmap block
//! refused at open and (through a `check` open) on every write, log entries aimed at the
//! header section or the log refused before anything is replayed, and a differencing
//! image whose parent locator survives every write byte for byte.

use std::path::Path;

use diskimg_blockio::{Error, MemStorage, OpenOptions, Storage};
use diskimg_testutil::{qemu_create, qemu_img, qemu_io, tempdir};

use crate::common::{create, open, open_for_check, try_open};

const MIB: u64 = 1 << 20;
pub(crate) const METADATA_GUID: &str = "06a27c8b90479a4bb8fe575f050f886e";

pub(crate) fn le32(b: &[u8], at: u64) -> u32 {
    u32::from_le_bytes(b[at as usize..at as usize + 4].try_into().unwrap())
}

pub(crate) fn le64(b: &[u8], at: u64) -> u64 {
    u64::from_le_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

pub(crate) fn put(b: &mut [u8], at: u64, v: &[u8]) {
    b[at as usize..at as usize + v.len()].copy_from_slice(v);
}

/// Recomputes the CRC-32C at byte 4 of the `len`-byte structure at `at`.
pub(crate) fn fix_crc(b: &mut [u8], at: u64, len: usize) {
    put(b, at + 4, &[0; 4]);
    let c = crc32c::crc32c(&b[at as usize..at as usize + len]);
    put(b, at + 4, &c.to_le_bytes());
}

/// (offset, length) of the region whose GUID (on-disk bytes, hex) is `guid`.
pub(crate) fn region(b: &[u8], guid: &str) -> (u64, u64) {
    let rt = 192 << 10;
    (0..u64::from(le32(b, rt + 8)))
        .map(|i| rt + 16 + 32 * i)
        .find(|&e| hex(&b[e as usize..e as usize + 16]) == guid)
        .map(|e| (le64(b, e + 16), u64::from(le32(b, e + 24))))
        .unwrap()
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A qemu-made 8 MiB image with 1 MiB blocks and block 0 written.
pub(crate) fn qemu_image(path: &Path) -> Vec<u8> {
    qemu_create(path, "vhdx", "block_size=1M", Some("8M"));
    qemu_io(path, "vhdx", &["write -P 0x5a 0 1M"]);
    std::fs::read(path).unwrap()
}

#[test]
fn overlapping_regions_are_refused_like_qemu() {
    let dir = tempdir();
    let img = dir.path().join("r.vhdx");
    let good = qemu_image(&img);
    // The BAT region over the log, then over the metadata region.
    for target in [MIB, 3 * MIB] {
        let mut b = good.clone();
        for rt in [192u64 << 10, 256 << 10] {
            put(&mut b, rt + 16 + 16, &target.to_le_bytes());
            fix_crc(&mut b, rt, 64 << 10);
        }
        std::fs::write(&img, &b).unwrap();
        let q = qemu_img(&["info", img.to_str().unwrap()]);
        let qerr = String::from_utf8_lossy(&q.stderr).into_owned();
        for ro in [true, false] {
            let e = try_open(&img, ro).unwrap_err().to_string();
            assert!(
                e.starts_with("VHDX region") && qerr.contains(&e),
                "ours: {e}; qemu: {qerr}"
            );
        }
        assert!(std::fs::read(&img).unwrap() == b);
    }
}

#[test]
fn bat_entries_aimed_at_metadata() {
    let dir = tempdir();
    let img = dir.path().join("b.vhdx");
    let good = qemu_image(&img);
    let (bat, _) = region(&good, "6677c22d23f600429d64115e9bfd4a08");
    let (meta, _) = region(&good, METADATA_GUID);
    // Block 1, fully present, over the log, the BAT region, the metadata region.
    for target in [MIB, bat, meta] {
        let mut b = good.clone();
        put(&mut b, bat + 8, &(target | 6).to_le_bytes());
        std::fs::write(&img, &b).unwrap();
        assert!(!qemu_img(&["info", img.to_str().unwrap()]).status.success());
        for ro in [true, false] {
            let e = try_open(&img, ro).unwrap_err();
            assert!(matches!(e, Error::Corrupt { .. }), "{target:#x}: {e}");
        }
        let dev = open_for_check(&img, false).unwrap();
        assert!(dev.check(Default::default()).unwrap().corruptions > 0);
        for (off, len) in [(MIB, 512u64), (MIB + 4096, 65536), (2 * MIB - 512, 512)] {
            let e = dev.write_at(&vec![0xee; len as usize], off).unwrap_err();
            assert!(
                matches!(e, Error::Corrupt { .. }),
                "{target:#x} at {off}: {e}"
            );
        }
        let e = dev.write_zeroes(MIB, 4096, Default::default()).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{target:#x}: {e}");
        drop(dev);
        // Only the headers (a new session's write GUIDs) may have changed.
        let after = std::fs::read(&img).unwrap();
        assert!(after[192 << 10..] == b[192 << 10..], "{target:#x}");
    }
}

/// One log entry of `sequence` with data sectors `(file offset, 4 KiB)`, in `guid`'s log.
pub(crate) fn log_entry(
    guid: &[u8],
    sequence: u64,
    file_size: u64,
    sectors: &[(u64, Vec<u8>)],
) -> Vec<u8> {
    let n = sectors.len() as u64;
    let header_sectors = (64 + 32 * n).div_ceil(4096);
    let len = (header_sectors + n) * 4096;
    let mut e = vec![0u8; len as usize];
    put(&mut e, 0, b"loge");
    put(&mut e, 8, &(len as u32).to_le_bytes());
    put(&mut e, 16, &sequence.to_le_bytes());
    put(&mut e, 24, &(n as u32).to_le_bytes());
    put(&mut e, 32, guid);
    put(&mut e, 48, &file_size.to_le_bytes());
    put(&mut e, 56, &file_size.to_le_bytes());
    for (i, (off, data)) in sectors.iter().enumerate() {
        let d = 64 + 32 * i as u64;
        put(&mut e, d, b"desc");
        put(&mut e, d + 4, &data[4092..]);
        put(&mut e, d + 8, &data[..8]);
        put(&mut e, d + 16, &off.to_le_bytes());
        put(&mut e, d + 24, &sequence.to_le_bytes());
        let s = (header_sectors + i as u64) * 4096;
        put(&mut e, s, b"data");
        put(&mut e, s + 4, &((sequence >> 32) as u32).to_le_bytes());
        put(&mut e, s + 8, &data[8..4092]);
        put(&mut e, s + 4092, &(sequence as u32).to_le_bytes());
    }
    fix_crc(&mut e, 0, len as usize);
    e
}

/// `good` with a dirty log whose one entry writes `sectors`.
pub(crate) fn with_log(good: &[u8], sectors: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut b = good.to_vec();
    let guid = [0x42u8; 16];
    let h = 64 << 10;
    let log = le64(&b, h + 72);
    let entry = log_entry(&guid, 7, b.len() as u64, sectors);
    put(&mut b, log, &entry);
    // Both headers name the log (the current one is the higher sequence number).
    for h in [64u64 << 10, 128 << 10] {
        put(&mut b, h + 48, &guid);
        fix_crc(&mut b, h, 4096);
    }
    b
}

fn open_mem(
    b: &[u8],
    ro: bool,
) -> diskimg_blockio::Result<std::sync::Arc<dyn diskimg_blockio::BlockDevice>> {
    use diskimg_blockio::Driver;
    let s: std::sync::Arc<dyn Storage> = std::sync::Arc::new(MemStorage::from_vec(b.to_vec()));
    diskimg_vhdx::DRIVER.open(s, &OpenOptions::new().read_only(ro))
}

#[test]
fn log_entries_aimed_at_headers_or_the_log_are_refused() {
    let dir = tempdir();
    let img = dir.path().join("l.vhdx");
    let good = qemu_image(&img);
    let log = le64(&good, (64 << 10) + 72);
    // The file identifier (the issue: the file then probes as raw), a header, a region
    // table, the reserved rest of the header section, the log itself.
    for target in [0, 64 << 10, 192 << 10, 512 << 10, log + 8192] {
        let b = with_log(&good, &[(target, vec![0u8; 4096])]);
        std::fs::write(&img, &b).unwrap();
        for ro in [true, false] {
            let e = try_open(&img, ro).unwrap_err();
            assert!(matches!(e, Error::Corrupt { .. }), "{target:#x}: {e}");
        }
        assert!(std::fs::read(&img).unwrap() == b, "{target:#x}");
    }
    // A well-aimed entry (a BAT sector: block 2 becomes PAYLOAD_BLOCK_ZERO) replays.
    let (bat, _) = region(&good, "6677c22d23f600429d64115e9bfd4a08");
    let mut sector = good[bat as usize..bat as usize + 4096].to_vec();
    put(&mut sector, 0, &2u64.to_le_bytes());
    let b = with_log(&good, &[(bat, sector)]);
    let dev = open_mem(&b, true).unwrap();
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    let dev = open_mem(&good, true).unwrap();
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0x5a));
}

/// An 8 MiB `base.vhdx` and its differencing `child.vhdx` (1 MiB blocks), made by us.
pub(crate) fn chain(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.vhdx");
    create(&base, 8 * MIB, "block_size=1M");
    let child = dir.join("child.vhdx");
    create(
        &child,
        8 * MIB,
        "backing_file=base.vhdx,backing_fmt=vhdx,block_size=1M",
    );
    (base, child)
}

#[test]
fn differencing_writes_keep_every_locator_byte() {
    let dir = tempdir();
    let (base, child) = chain(dir.path());
    let before = std::fs::read(&child).unwrap();
    let (meta, len) = region(&before, METADATA_GUID);
    let dev = open(&child, false);
    dev.set_backing(Some(open(&base, true))).unwrap();
    for (i, (off, n)) in [
        (100u64, 10usize),
        (MIB, MIB as usize),
        (3 * MIB - 7, 70_000),
        (7 * MIB, 512),
    ]
    .into_iter()
    .enumerate()
    {
        dev.write_at(&vec![i as u8 + 1; n], off).unwrap();
    }
    dev.write_zeroes(5 * MIB, 2 * MIB, Default::default())
        .unwrap();
    dev.flush().unwrap();
    drop(dev);
    let after = std::fs::read(&child).unwrap();
    let m = meta as usize..(meta + len) as usize;
    assert!(
        before[m.clone()] == after[m],
        "the metadata region (parent locator) changed"
    );
    let dev = open(&child, true);
    assert_eq!(dev.info().backing.unwrap().filename, "base.vhdx");
    assert_eq!(dev.check(Default::default()).unwrap().corruptions, 0);
}

#[test]
fn sector_bitmap_blocks_are_metadata() {
    let dir = tempdir();
    let (_, child) = chain(dir.path());
    let dev = open(&child, false);
    dev.write_at(&[1; 512], 0).unwrap();
    dev.flush().unwrap();
    drop(dev);
    let good = std::fs::read(&child).unwrap();
    let (bat, _) = region(&good, "6677c22d23f600429d64115e9bfd4a08");
    let (meta, _) = region(&good, METADATA_GUID);
    // Chunk ratio 4096 for 1 MiB blocks with 512-byte sectors: entry 4096 is the bitmap.
    let sb = le64(&good, bat + 8 * 4096) & !(MIB - 1);
    assert_ne!(sb, 0);
    // Block 1 (partially present) over the bitmap block; then the bitmap over the
    // metadata region.
    for (entry, value) in [(1u64, sb | 7), (4096, meta | 6)] {
        let mut b = good.clone();
        put(&mut b, bat + 8 * entry, &value.to_le_bytes());
        std::fs::write(&child, &b).unwrap();
        let e = try_open(&child, true).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{entry}: {e}");
        let dev = open_for_check(&child, false).unwrap();
        let e = dev.write_at(&[2; 512], MIB + 512).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{entry}: {e}");
        drop(dev);
        let after = std::fs::read(&child).unwrap();
        assert!(after[192 << 10..] == b[192 << 10..], "{entry}");
    }
}
