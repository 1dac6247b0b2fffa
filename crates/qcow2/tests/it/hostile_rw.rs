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

/// Offset in the header of the bitmaps extension's data (header extension 0x23852875).
pub(crate) fn bitmaps_ext(img: &[u8]) -> usize {
    let mut off = be32(img, 100) as usize;
    while be32(img, off) != 0x2385_2875 {
        assert_ne!(be32(img, off), 0, "no bitmaps extension");
        off += 8 + (be32(img, off + 4) as usize).next_multiple_of(8);
    }
    off + 8
}

/// The file offset of the first bitmap directory entry.
fn bitmap_entry(img: &[u8]) -> usize {
    be64(img, bitmaps_ext(img) + 16) as usize
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
    let refused = "Bitmap 'b0' doesn't satisfy the constraints";
    let e = open_err(img.clone());
    assert_eq!(e.to_string(), refused, "qemu's check_dir_entry");
    // Out of qemu's range (9..=31): refused when the directory is parsed.
    img[entry + 17] = 0;
    let e = open_err(img);
    assert_eq!(e.to_string(), refused);
}

/// A bitmap directory laid over the snapshot table (its first entry read as a directory
/// entry: the snapshot's L1 table as the bitmap table, its id and name lengths as the
/// flags). Marking the bitmap in use rewrites the directory in place, which would set
/// bit 0 of the snapshot's name length; as qemu's `bitmap_list_store`, the write is
/// refused because it overlaps other metadata, and the snapshot table is left alone.
#[test]
fn bitmap_directory_over_the_snapshot_table_is_not_rewritten() {
    let dir = tempdir();
    let p = dir.path().join("o.qcow2");
    let ps = p.to_string_lossy().into_owned();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &ps, "1M"]);
    diskimg_testutil::qemu_io(&p, "qcow2", &["write -P 1 0 64k"]);
    qemu_img_ok(&["snapshot", "-c", "s1", &ps]);
    qemu_img_ok(&["bitmap", "--add", "-g", "65536", &ps, "b0"]);
    let mut img = std::fs::read(&p).unwrap();
    let snap = be64(&img, 64) as usize;
    // The snapshot entry as a directory entry: type 1, 64 KiB granules, a 2-byte name
    // "b0" (in the date and VM clock fields), no extra data. Its id and name lengths are
    // the flags: an empty id leaves only "auto" (reserved flags are refused at open), and
    // its L1 entry is the bitmap table (the copied flag is a reserved bit there).
    img[snap + 16..snap + 26].copy_from_slice(&[1, 16, 0, 2, 0, 0, 0, 0, b'b', b'0']);
    img[snap + 12..snap + 14].fill(0);
    assert_eq!(be32(&img, snap + 12), 2, "id and name lengths as flags");
    let l1 = be64(&img, snap) as usize;
    img[l1] &= 0x7f;
    let ext = bitmaps_ext(&img);
    img[ext + 16..ext + 24].copy_from_slice(&(snap as u64).to_be_bytes());
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
    let opened = DRIVER.open(s.clone(), &OpenOptions::new());
    let mut after = vec![0u8; s.len().unwrap() as usize];
    s.read_exact_at(&mut after, 0).unwrap();
    assert_eq!(be32(&after, snap + 12), 2, "snapshot name length changed");
    let Err(e) = opened else {
        panic!("the in-place directory write was not refused");
    };
    assert!(
        e.to_string().contains("overlaps with snapshot table"),
        "{e}"
    );
}

/// `bad` is refused by qemu-img and by us (read-only and read-write) in the same words.
fn assert_refused_as_qemu(bad: &[u8], what: &str) {
    let dir = tempdir();
    let p = dir.path().join("c.qcow2");
    let ps = p.to_string_lossy().into_owned();
    std::fs::write(&p, bad).unwrap();
    let q = diskimg_testutil::qemu_img(&["info", "-f", "qcow2", &ps]);
    assert!(!q.status.success(), "{what}: qemu-img opened it");
    let qemu = String::from_utf8_lossy(&q.stderr);
    let want = qemu
        .trim()
        .strip_prefix(&format!("qemu-img: Could not open '{ps}': "))
        .unwrap_or_else(|| panic!("{what}: {qemu}"));
    for ro in [true, false] {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bad.to_vec()));
        let e = DRIVER
            .open(s, &OpenOptions::new().read_only(ro))
            .err()
            .unwrap_or_else(|| panic!("{what}: opened (ro {ro})"));
        assert_eq!(e.to_string(), want, "{what} (ro {ro})");
    }
}

/// qemu's `check_dir_entry` at every open: a directory entry with a reserved flag, the
/// wrong type, no table or a misaligned one makes the image unopenable, read-only too,
/// in qemu's words; so do a bitmap table entry with a reserved bit and a bitmaps
/// extension out of qemu's bounds. qemu-img judges each image.
#[test]
fn bitmap_directory_constraints_as_qemu() {
    let img = with_bitmap("cluster_size=64k", "64M", &["-g", "64k"]);
    let entry = bitmap_entry(&img);
    let table = be64(&img, entry) as usize;
    let ext = bitmaps_ext(&img);
    let cases: [(&str, usize, &[u8]); 14] = [
        ("reserved flag bit 2", entry + 12, &[0, 0, 0, 6]),
        ("reserved flag bit 31", entry + 12, &[0x80, 0, 0, 2]),
        ("type 2", entry + 16, &[2]),
        ("no table", entry + 8, &[0, 0, 0, 0]),
        ("misaligned table", entry + 6, &[2, 0]),
        ("granularity 2^32", entry + 17, &[32]),
        // The disk needs one entry: qemu's load_bitmap_data wants exactly that many.
        ("table one entry too large", entry + 8, &[0, 0, 0, 2]),
        (
            "table of 8193 entries (over 512 MiB)",
            entry + 8,
            &[0, 0, 0x20, 1],
        ),
        ("table of 2^27 + 1 entries", entry + 8, &[8, 0, 0, 1]),
        ("table entry reserved bit", table, &[0x80]),
        ("no bitmaps", ext, &[0, 0, 0, 0]),
        ("2^16 bitmaps", ext, &[0, 1, 0, 0]),
        ("misaligned directory", ext + 22, &[2, 0]),
        ("directory of 65 MiB", ext + 12, &[4, 16, 0, 0]),
    ];
    for (what, at, val) in cases {
        let mut bad = img.clone();
        bad[at..at + val.len()].copy_from_slice(val);
        assert_refused_as_qemu(&bad, what);
    }
    let mut bad = img.clone();
    bad[entry + 12..entry + 16].copy_from_slice(&[0, 0, 0, 6]);
    let e = open_err(bad);
    assert_eq!(e.to_string(), "Bitmap 'b0' doesn't satisfy the constraints");
}

/// The data-file-raw autoclear bit on an image without a data file (qemu refuses to do
/// I/O on it). Zero writes and discards used to zero the guest range in the image file
/// itself — here its header and tables. They must leave the image intact: with the bit
/// cleared again qemu finds it clean and reading zeroes where the guest zeroed.
#[test]
fn data_file_raw_bit_without_a_data_file_is_refused_as_qemu() {
    let dir = tempdir();
    let p = dir.path().join("r.qcow2");
    let ps = p.to_string_lossy().into_owned();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &ps, "1M"]);
    diskimg_testutil::qemu_io(&p, "qcow2", &["write -P 5 0 256k"]);
    let mut img = std::fs::read(&p).unwrap();
    let autoclear = be64(&img, 88);
    img[88..96].copy_from_slice(&(autoclear | 2).to_be_bytes());
    std::fs::write(&p, &img).unwrap();
    // Zero writes and discards of such an image once landed in the image file itself
    // (the header overwritten); qemu refuses to open it for I/O, and so do we now.
    let msg = "data-file-raw requires a data file";
    let q = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", &ps])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&q.stderr).contains(msg), "{q:?}");
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
    match DRIVER.open(s, &OpenOptions::new()) {
        Err(e) => assert!(e.to_string().contains(msg), "{e}"),
        Ok(_) => panic!("opened an image qemu refuses"),
    }
    // Metadata only (`info`, qemu's BDRV_O_NO_IO) skips data files and opens it.
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
    let o = OpenOptions::new().driver_option(diskimg_qcow2::NO_IO_OPTION, "on");
    DRIVER.open(s, &o).expect("metadata-only open");
}

/// A bitmap marked in use with a table of the wrong size (one entry too many, and none
/// of the 256 a 64 GiB disk at 512-byte granules needs): qemu never reads an in-use
/// bitmap, so both images open (read-only and read-write) and are clean; editing the
/// bitmap is refused as inconsistent in qemu's words, with its hint, and `--remove`
/// removes it as qemu does.
#[test]
fn in_use_bitmap_with_a_table_of_the_wrong_size_opens_as_qemu() {
    use diskimg_blockio::BitmapOp;
    for (size, gran, table_size) in [("64M", "65536", 2u32), ("64G", "512", 1)] {
        let mut img = with_bitmap("cluster_size=64k", size, &["-g", gran]);
        let entry = bitmap_entry(&img);
        img[entry + 8..entry + 12].copy_from_slice(&table_size.to_be_bytes());
        img[entry + 12..entry + 16].copy_from_slice(&3u32.to_be_bytes());
        let dir = tempdir();
        let p = dir.path().join("u.qcow2");
        let ps = p.to_string_lossy().into_owned();
        std::fs::write(&p, &img).unwrap();
        diskimg_testutil::assert_qemu_check_clean(&p, "qcow2");
        for ro in [true, false] {
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
            let dev = DRIVER.open(s, &OpenOptions::new().read_only(ro)).unwrap();
            let r = dev.check(Default::default()).unwrap();
            assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
        }
        let q = diskimg_testutil::qemu_img(&["bitmap", "--clear", &ps, "b0"]);
        assert!(!q.status.success(), "{size}: qemu-img cleared it");
        let qerr = String::from_utf8_lossy(&q.stderr);
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
        let e = diskimg_qcow2::edit_bitmaps(s, "b0", &[BitmapOp::Clear]).unwrap_err();
        assert_eq!(
            format!("qemu-img: {e}\n"),
            qerr,
            "{size}: the refusal of --clear"
        );
        let s = Arc::new(MemStorage::from_vec(img.clone()));
        diskimg_qcow2::edit_bitmaps(s.clone(), "b0", &[BitmapOp::Remove]).unwrap();
        std::fs::write(&p, s.to_vec()).unwrap();
        diskimg_testutil::assert_qemu_check_clean(&p, "qcow2");
        let info = diskimg_testutil::qemu_img(&["info", &ps]);
        assert!(
            !String::from_utf8_lossy(&info.stdout).contains("b0"),
            "{size}"
        );
    }
}

/// A misaligned refcount block offset met by an allocating write: the corruption event
/// names it in qemu's words, whose `%#x` prints the reftable index 0 as `0`.
#[test]
fn misaligned_refcount_block_named_as_qemu() {
    let dir = tempdir();
    let p = dir.path().join("m.qcow2");
    let ps = p.to_string_lossy().into_owned();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &ps, "1M"]);
    let mut img = std::fs::read(&p).unwrap();
    let rt = be64(&img, 48) as usize;
    let rb = be64(&img, rt);
    img[rt..rt + 8].copy_from_slice(&(rb + 512).to_be_bytes());
    std::fs::write(&p, &img).unwrap();
    let q = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 64k", &ps])
        .output()
        .unwrap();
    let want = format!(
        "Refblock offset {:#x} unaligned (reftable index: 0)",
        rb + 512
    );
    let qerr = String::from_utf8_lossy(&q.stderr);
    assert!(
        qerr.contains(&format!("Marking image as corrupt: {want};")),
        "{qerr}"
    );
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
    let dev = DRIVER.open(s, &OpenOptions::new()).unwrap();
    let e = dev.write_at(&[1; 65536], 0).unwrap_err();
    assert_eq!(e.to_string(), want);
}
