//! Tables a header claims are checked against the file before memory is set aside for
//! them: a hostile header costs memory proportional to the file, never to its claims.
//! Each image is opened under a 1 MiB metadata limit; a table that lies past the end of
//! the file must be refused as corrupt (not as over the limit, which would mean the
//! buffer was sized first).

use std::sync::Arc;

use diskimg_blockio::{Driver, Error, Limits, MemStorage, OpenOptions, Storage};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{qemu_img, qemu_img_ok, tempdir};

use crate::hostile_rw::bitmaps_ext;

fn small_limits() -> Limits {
    let mut l = Limits::default();
    l.max_metadata_bytes = 1 << 20;
    l
}

/// qemu-img's image (`create` then `bitmap --add` when `bitmap`) as bytes.
fn qemu_image(bitmap: bool) -> Vec<u8> {
    let dir = tempdir();
    let p = dir.path().join("t.qcow2");
    let ps = p.to_string_lossy().into_owned();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &ps, "64M"]);
    if bitmap {
        qemu_img_ok(&["bitmap", "--add", &ps, "b0"]);
    }
    std::fs::read(&p).unwrap()
}

fn open(img: &[u8], limits: Limits) -> diskimg_blockio::Result<()> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.to_vec()));
    DRIVER
        .open(s, &OpenOptions::new().read_only(true).limits(limits))
        .map(drop)
}

fn assert_corrupt(img: &[u8], what: &str) {
    open(img, Limits::default()).expect_err(what);
    match open(img, small_limits()) {
        Err(e @ Error::Corrupt { .. }) => eprintln!("{what}: {e}"),
        Err(e) => panic!("{what}: sized before the range was checked: {e}"),
        Ok(()) => panic!("{what}: opened"),
    }
}

#[test]
fn tables_past_the_end_of_the_file_are_refused_before_allocation() {
    let img = qemu_image(false);
    assert!(open(&img, small_limits()).is_ok(), "the untouched image");
    // An L1 table of 2^20 entries (8 MiB) where the file has ~200 KiB.
    let mut l1 = img.clone();
    l1[36..40].copy_from_slice(&(1u32 << 20).to_be_bytes());
    assert_corrupt(&l1, "L1 table");
    // A refcount table of 128 clusters (8 MiB).
    let mut rt = img.clone();
    rt[56..60].copy_from_slice(&128u32.to_be_bytes());
    assert_corrupt(&rt, "refcount table");
}

/// A bitmap directory of 60 MiB in a file of a few hundred KiB: qemu reads zeroes past
/// the end and refuses the first all-zero entry; we refuse before reading.
#[test]
fn bitmap_directory_past_the_end_of_the_file_is_refused_before_allocation() {
    let img = qemu_image(true);
    assert!(open(&img, small_limits()).is_ok(), "the untouched image");
    let ext = bitmaps_ext(&img);
    let mut bad = img.clone();
    bad[ext + 8..ext + 16].copy_from_slice(&(60u64 << 20).to_be_bytes());
    let dir = tempdir();
    let p = dir.path().join("d.qcow2");
    std::fs::write(&p, &bad).unwrap();
    let q = qemu_img(&["info", "-f", "qcow2", &p.to_string_lossy()]);
    assert!(!q.status.success(), "qemu-img opened it");
    assert_corrupt(&bad, "bitmap directory");
}
