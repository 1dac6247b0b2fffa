//! Hostile input met by read-write use (what the `qcow2_rw` fuzz target reaches):
//! persistent bitmaps loaded at a read-write open, offline bitmap edits, repairs,
//! snapshots. Each case ends in a clean error or a clean open, with memory bounded by the
//! file, never by what a header claims.

use std::sync::Arc;

use diskimg_blockio::{Driver, MemStorage, OpenOptions, Storage};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{qemu_img_ok, tempdir};

/// `qemu-img create -f qcow2 -o OPTS SIZE` + `qemu-img bitmap --add ARGS b0`, as bytes.
fn with_bitmap(opts: &str, size: &str, add: &[&str]) -> Vec<u8> {
    let dir = tempdir();
    let p = dir.path().join("b.qcow2");
    let ps = p.to_string_lossy().into_owned();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, &ps, size]);
    let mut args = vec!["bitmap", "--add"];
    args.extend_from_slice(add);
    args.extend([ps.as_str(), "b0"]);
    qemu_img_ok(&args);
    std::fs::read(&p).unwrap()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The file offset of the first bitmap directory entry (header extension 0x23852875).
fn bitmap_entry(img: &[u8]) -> usize {
    let mut off = be32(img, 100) as usize;
    loop {
        let (ty, len) = (be32(img, off), be32(img, off + 4) as usize);
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            return be64(img, off + 8 + 16) as usize;
        }
        off += 8 + len.next_multiple_of(8);
    }
}

/// The error of a read-write open of `img`.
fn open_err(img: Vec<u8>) -> diskimg_blockio::Error {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
    match DRIVER.open(s, &OpenOptions::new()) {
        Ok(_) => panic!("hostile image opened read-write"),
        Err(e) => e,
    }
}

/// A bitmap of 512-byte granules on a 64 PiB disk of 2 MiB clusters needs 2^23 table
/// entries; this one has 2. The table is checked (and read from the file) before the
/// bitmap is sized by the disk, which would reserve 2^23 chunk slots (128 MiB) first.
#[test]
fn bitmap_table_too_small_for_a_huge_disk_is_refused_before_sizing() {
    let mut img = with_bitmap("cluster_size=2M", "64P", &["-g", "2G"]);
    let entry = bitmap_entry(&img);
    assert_eq!(img[entry + 17], 31, "granularity bits of -g 2G");
    img[entry + 17] = 9;
    let e = open_err(img.clone());
    assert!(e.to_string().contains("bitmap table too small"), "{e}");
    // Out of qemu's range (9..=31): refused when the directory is parsed.
    img[entry + 17] = 0;
    let e = open_err(img);
    assert!(e.to_string().contains("granularity out of range"), "{e}");
}
