//! Memory proportional to the file: the BAT, the metadata table and items, and the log
//! a header or region table claims are checked against the file before they are
//! allocated. Each image is opened under a 1 MiB metadata limit; a structure past the
//! end of the file must be refused as corrupt, not as over the limit (which would mean
//! its buffer was sized first).

use diskimg_blockio::Error;
use diskimg_testutil::{open_under_limit, qemu_create, qemu_img, tempdir};

use crate::guard::{METADATA_GUID, fix_crc, le32, put, qemu_image, region};

const MIB: u64 = 1 << 20;
const BAT_GUID: &str = "6677c22d23f600429d64115e9bfd4a08";
/// The virtual disk size item's GUID, on-disk bytes.
const SIZE_ITEM: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];

fn open_small(img: &[u8]) -> diskimg_blockio::Result<()> {
    open_under_limit(&diskimg_vhdx::DRIVER, img, MIB)
}

/// Sets the region `guid` to `offset`/`length` in both region tables.
fn move_region(b: &mut [u8], guid: &str, offset: u64, length: u64) {
    for rt in [192u64 << 10, 256 << 10] {
        let e = (0..u64::from(le32(b, rt + 8)))
            .map(|i| rt + 16 + 32 * i)
            .find(|&e| crate::guard::hex(&b[e as usize..e as usize + 16]) == guid)
            .unwrap();
        put(b, e + 16, &offset.to_le_bytes());
        put(b, e + 24, &(length as u32).to_le_bytes());
        fix_crc(b, rt, 64 << 10);
    }
}

/// The metadata table entry (its file offset) of the virtual disk size item.
fn size_entry(b: &[u8]) -> u64 {
    let (meta, _) = region(b, METADATA_GUID);
    (0..u64::from(u16::from_le_bytes([
        b[meta as usize + 10],
        b[meta as usize + 11],
    ])))
        .map(|i| meta + 32 + 32 * i)
        .find(|&e| b[e as usize..e as usize + 16] == SIZE_ITEM)
        .unwrap()
}

/// Refused as corrupt with `what` in the message, under the small limit; and qemu-img's
/// verdict on the same bytes (true when it opens them).
fn assert_refused(b: &[u8], what: &str) -> bool {
    match open_small(b) {
        Err(e @ Error::Corrupt { .. }) => assert!(e.to_string().contains(what), "{e}"),
        Err(e) => panic!("{what}: sized before the range was checked: {e}"),
        Ok(()) => panic!("{what}: opened"),
    }
    let dir = tempdir();
    let p = dir.path().join("h.vhdx");
    std::fs::write(&p, b).unwrap();
    let q = qemu_img(&["info", "-f", "vhdx", p.to_str().unwrap()]);
    eprintln!("{what}: qemu-img: {}", String::from_utf8_lossy(&q.stderr));
    q.status.success()
}

#[test]
fn structures_past_the_end_of_the_file_are_refused_before_allocation() {
    let dir = tempdir();
    let good = qemu_image(&dir.path().join("g.vhdx"));
    assert!(open_small(&good).is_ok(), "the untouched image");
    assert!((good.len() as u64) < 16 * MIB);
    // A 2 TiB disk of 1 MiB blocks: a 16 MiB BAT, in a region moved past the end.
    let mut bat = good.clone();
    let size_at = u64::from(le32(&bat, size_entry(&bat) + 16)) + region(&bat, METADATA_GUID).0;
    put(&mut bat, size_at, &(2u64 << 40).to_le_bytes());
    move_region(&mut bat, BAT_GUID, 64 * MIB, 17 * MIB);
    // qemu opens each of these (bytes past the end of the file read as zeroes: an empty
    // BAT, a zero size, an empty log); we refuse a structure the file does not hold.
    assert!(assert_refused(
        &bat,
        "VHDX BAT lies beyond the end of the file"
    ));
    // A 32 MiB virtual size item in a 64 MiB metadata region reaching past the end (in
    // an image with no block allocated, which qemu would take for an overlap).
    let empty = dir.path().join("e.vhdx");
    qemu_create(&empty, "vhdx", "block_size=1M", Some("8M"));
    let mut item = std::fs::read(&empty).unwrap();
    let (meta, _) = region(&item, METADATA_GUID);
    move_region(&mut item, METADATA_GUID, meta, 64 * MIB);
    let e = size_entry(&item);
    put(&mut item, e + 20, &(32u32 << 20).to_le_bytes());
    assert!(assert_refused(
        &item,
        "VHDX metadata item lies beyond the end of the file"
    ));
    // A dirty 16 MiB log past the end.
    let mut log = good.clone();
    for h in [64u64 << 10, 128 << 10] {
        put(&mut log, h + 48, &[0x42; 16]);
        put(&mut log, h + 68, &(16u32 << 20).to_le_bytes());
        put(&mut log, h + 72, &(64 * MIB).to_le_bytes());
        fix_crc(&mut log, h, 4096);
    }
    assert!(assert_refused(
        &log,
        "VHDX log lies beyond the end of the file"
    ));
    // A valid log entry whose LastFileOffset grows the file to 1 TiB (zeroes) does not
    // make room for the BAT moved past the real end.
    let (meta, _) = region(&bat, METADATA_GUID);
    let same = bat[meta as usize..meta as usize + 4096].to_vec();
    let mut grown = crate::guard::with_log(&bat, &[(meta, same)]);
    let entry = crate::guard::le64(&grown, (64 << 10) + 72);
    put(&mut grown, entry + 56, &(1u64 << 40).to_le_bytes());
    let len = le32(&grown, entry + 8) as usize;
    fix_crc(&mut grown, entry, len);
    // (qemu-img info refuses it read-only: the log needs replaying.)
    assert!(!assert_refused(
        &grown,
        "VHDX BAT lies beyond the end of the file"
    ));
}

/// A log whose every sector starts an entry spanning almost the whole log (checksums
/// wrong): each candidate passes the cheap checks, so a search without a bound
/// checksums the log once per sector, quadratic in its size.
#[test]
fn a_log_of_overlapping_entries_is_refused_not_searched_forever() {
    let dir = tempdir();
    let mut b = qemu_image(&dir.path().join("g.vhdx"));
    let log = crate::guard::le64(&b, (64 << 10) + 72);
    let log_len = u64::from(le32(&b, (64 << 10) + 68));
    let sectors = log_len / 4096;
    let guid = [0x42u8; 16];
    // Two header sectors (254 descriptors; the next sector's entry header takes the
    // two slots at the sector boundary) and 252 data descriptors: 254 sectors.
    let hs = sectors / 127;
    let count = 128 * hs - 2;
    let length = 127 * hs * 4096;
    for k in 0..sectors {
        let s = log + k * 4096;
        put(&mut b, s, b"loge");
        put(&mut b, s + 8, &(length as u32).to_le_bytes());
        put(&mut b, s + 16, &7u64.to_le_bytes());
        put(&mut b, s + 24, &(count as u32).to_le_bytes());
        put(&mut b, s + 32, &guid);
        for i in 2..128 {
            put(&mut b, s + 32 * i, b"desc");
        }
    }
    for h in [64u64 << 10, 128 << 10] {
        put(&mut b, h + 48, &guid);
        fix_crc(&mut b, h, 4096);
    }
    match open_small(&b) {
        Err(e @ Error::Corrupt { .. }) => {
            assert!(e.to_string().contains("overlap too much"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(()) => panic!("searched it all"),
    }
    // The same log made valid-free but cheap (one-sector entries) is searched and
    // found empty: the bound only refuses the costly shape.
    for k in 0..sectors {
        put(&mut b, log + k * 4096 + 8, &4096u32.to_le_bytes());
        put(&mut b, log + k * 4096 + 24, &0u32.to_le_bytes());
    }
    open_small(&b).expect("a log of torn one-sector entries");
}

/// The parent locator item's GUID, on-disk bytes.
const LOCATOR_ITEM: &str = "2b5fd3a80bb34d45abf7d3d84834ab0c";

#[test]
fn parent_locator_entries_sharing_their_bytes_are_refused() {
    let dir = tempdir();
    let (_, child) = crate::guard::chain(dir.path());
    let mut b = std::fs::read(&child).unwrap();
    let (meta, meta_len) = region(&b, METADATA_GUID);
    let n = u64::from(u16::from_le_bytes([
        b[meta as usize + 10],
        b[meta as usize + 11],
    ]));
    let e = (0..n)
        .map(|i| meta + 32 + 32 * i)
        .find(|&e| crate::guard::hex(&b[e as usize..e as usize + 16]) == LOCATOR_ITEM)
        .unwrap();
    let item = meta + u64::from(le32(&b, e + 16));
    // 2000 entries whose keys and values are all the same 32 KiB of UTF-16 'a's: a 56 KiB
    // item that would decode to 125 MiB of strings.
    let (count, units) = (2000u64, 16384u64);
    let blob = 20 + 12 * count;
    let len = blob + 2 * units;
    assert!(item + len <= meta + meta_len);
    put(&mut b, e + 20, &(len as u32).to_le_bytes());
    put(&mut b, item + 18, &(count as u16).to_le_bytes());
    for i in 0..count {
        let at = item + 20 + 12 * i;
        put(&mut b, at, &(blob as u32).to_le_bytes());
        put(&mut b, at + 4, &(blob as u32).to_le_bytes());
        put(&mut b, at + 8, &((2 * units) as u16).to_le_bytes());
        put(&mut b, at + 10, &((2 * units) as u16).to_le_bytes());
    }
    for k in 0..units {
        put(&mut b, item + blob + 2 * k, &[b'a', 0]);
    }
    match open_small(&b) {
        Err(e @ Error::Corrupt { .. }) => assert!(e.to_string().contains("overlap"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(()) => panic!("opened"),
    }
}
