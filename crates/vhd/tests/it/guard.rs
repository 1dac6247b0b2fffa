//! Metadata protection (issue 15.2 and 15.3): writes to a differencing disk keep every
//! parent-locator byte; BAT entries aimed at the footer copy, the dynamic header, the BAT,
//! a locator or the end footer are refused at open, and — when a `check` open lets such
//! an image through — every data write that would land there is refused with
//! [`Error::Corrupt`], the metadata bytes left as they were.

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{Driver, Error, ExtentKind, FileStorage, OpenOptions, Storage};
use diskimg_testutil::{qemu_io, tempdir};

use crate::{create, open};

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The (offset, data length, data space) of each parent locator entry in use.
fn locators(file: &[u8]) -> Vec<(u64, u64, u32)> {
    (0..8)
        .map(|i| 512 + 576 + i * 24)
        .filter(|&e| be32(file, e) != 0)
        .map(|e| {
            (
                be64(file, e + 16),
                u64::from(be32(file, e + 8)),
                be32(file, e + 4),
            )
        })
        .collect()
}

fn area(file: &[u8], l: (u64, u64, u32)) -> Vec<u8> {
    file[l.0 as usize..(l.0 + l.1.next_multiple_of(512)) as usize].to_vec()
}

/// A 64 MiB dynamic `base.vpc` and its differencing child `over.vpc` with W2ku, W2ru and
/// MacX locators (the issue's `create -f vpc -b base.vpc -F vpc over.vpc`).
fn chain(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.vpc");
    create(&base, 64 << 20, "");
    let over = dir.join("over.vpc");
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(&over).unwrap());
    let p = FileStorage::open(&base, true).unwrap();
    diskimg_vhd::create_differencing_in(s.as_ref(), &p, "base.vpc", Some(dir)).unwrap();
    over
}

#[test]
fn differencing_writes_keep_every_locator_byte() {
    let dir = tempdir();
    let over = chain(dir.path());
    let before = std::fs::read(&over).unwrap();
    let locs = locators(&before);
    assert_eq!(locs.len(), 3);
    let dev = open(&over, false);
    dev.set_backing(Some(open(&dir.path().join("base.vpc"), true)))
        .unwrap();
    for (i, off) in [0u64, 8192, 5 << 20, (64 << 20) - 4096]
        .into_iter()
        .enumerate()
    {
        dev.write_at(&[0xab ^ i as u8; 4096], off).unwrap();
    }
    dev.write_zeroes(9 << 20, 3 << 20, Default::default())
        .unwrap();
    dev.flush().unwrap();
    drop(dev);
    let after = std::fs::read(&over).unwrap();
    for l in &locs {
        assert!(
            area(&before, *l) == area(&after, *l),
            "locator at {:#x}",
            l.0
        );
    }
    let dev = open(&over, true);
    let b = dev.info().backing.unwrap();
    assert_eq!(b.filename, "base.vpc");
    let mut buf = [0u8; 4096];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf == [0xab; 4096]);
    // qemu reads the child's blocks (it ignores the parent) where we put them.
    qemu_io(&over, "vpc", &["read -P 0xab 0 512", "read -P 0xa9 5M 4k"]);
    let r = dev.check(Default::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
}

#[test]
fn reserved_locator_space_in_bytes_is_kept_free() {
    // Virtual PC and Hyper-V store "Platform Data Space" in bytes: 64 KiB reserved for
    // the first locator must not receive a block either.
    let dir = tempdir();
    let over = chain(dir.path());
    let mut b = std::fs::read(&over).unwrap();
    let e = 512 + 576;
    b[e + 4..e + 8].copy_from_slice(&65536u32.to_be_bytes());
    std::fs::write(&over, &b).unwrap();
    let first = locators(&b)[0].0;
    let dev = open(&over, false);
    dev.write_at(&[1; 512], 0).unwrap();
    match dev.map(0, 512).unwrap().kind {
        ExtentKind::Data { offset: Some(o) } => assert!(o >= first + 65536, "{o:#x}"),
        k => panic!("{k:?}"),
    }
}

fn open_with(
    path: &Path,
    ro: bool,
    check: bool,
) -> diskimg_blockio::Result<Arc<dyn diskimg_blockio::BlockDevice>> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, ro).unwrap());
    let mut o = OpenOptions::new().read_only(ro);
    if check {
        o = o.driver_option("check", "on");
    }
    diskimg_vhd::DRIVER.open(s, &o)
}

#[test]
fn bat_entries_aimed_at_metadata() {
    let dir = tempdir();
    let over = chain(dir.path());
    let dev = open(&over, false);
    dev.write_at(&[7; 512], 2 << 20).unwrap();
    dev.flush().unwrap();
    drop(dev);
    let good = std::fs::read(&over).unwrap();
    let loc = locators(&good)[1].0;
    let unit = (2 << 20) + 512u64;
    let over_end_footer = (good.len() as u64 - unit) / 512;
    // Block 0's sector: the footer copy, the dynamic header, the BAT, a locator; then a
    // block covering the footer at the end of the file.
    for (sector, meta) in [
        (0, true),
        (1, true),
        (3, true),
        (loc / 512, true),
        (over_end_footer, false),
    ] {
        let mut b = good.clone();
        b[1536..1540].copy_from_slice(&(sector as u32).to_be_bytes());
        std::fs::write(&over, &b).unwrap();
        for ro in [true, false] {
            let e = open_with(&over, ro, false).unwrap_err();
            assert!(matches!(e, Error::Corrupt { .. }), "sector {sector}: {e}");
        }
        // A check open lets the image through: check reports it.
        let dev = open_with(&over, false, true).unwrap();
        let r = dev.check(Default::default()).unwrap();
        assert!(r.corruptions > 0, "sector {sector}: {r:?}");
        if !meta {
            continue;
        }
        // Every write into block 0 would overwrite metadata (its data or its bitmap).
        for (off, len) in [(0u64, 512usize), (4096, 4096), ((2 << 20) - 512, 512)] {
            let e = dev.write_at(&vec![0xee; len], off).unwrap_err();
            assert!(
                matches!(e, Error::Corrupt { .. }),
                "sector {sector} at {off}: {e}"
            );
        }
        let e = dev
            .write_zeroes(0, 2 << 20, Default::default())
            .unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "sector {sector}: {e}");
        drop(dev);
        assert!(std::fs::read(&over).unwrap() == b, "sector {sector}");
    }
}

#[test]
fn dynamic_disk_bat_entries_aimed_at_metadata() {
    // Dynamic disks ignore the bitmap for reads; data writes themselves are guarded.
    let dir = tempdir();
    let img = dir.path().join("d.vpc");
    create(&img, 8 << 20, "");
    let good = std::fs::read(&img).unwrap();
    for sector in [0u32, 1, 2] {
        let mut b = good.clone();
        b[1536..1540].copy_from_slice(&sector.to_be_bytes());
        // Keep the file long enough for the bogus block.
        b.resize((3 << 20) + 512, 0);
        std::fs::write(&img, &b).unwrap();
        let e = open_with(&img, false, false).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "sector {sector}: {e}");
        let dev = open_with(&img, false, true).unwrap();
        let e = dev.write_at(&[0xee; 512], 0).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "sector {sector}: {e}");
        drop(dev);
        assert!(std::fs::read(&img).unwrap() == b, "sector {sector}");
    }
}
