//! Memory proportional to the file: the block map a header claims is checked against
//! the file before it is allocated. Images are opened under a 1 MiB metadata limit; a
//! map past the end of the file must be refused as corrupt, not as over the limit
//! (which would mean its buffer was sized first).

use diskimg_blockio::Error;
use diskimg_testutil::{open_under_limit, qemu_img, qemu_img_ok, tempdir};

fn open_small(img: &[u8]) -> diskimg_blockio::Result<()> {
    open_under_limit(&diskimg_vdi::DRIVER, img, 1 << 20)
}

#[test]
fn a_block_map_past_the_end_of_the_file_is_refused_before_allocation() {
    let dir = tempdir();
    let p = dir.path().join("t.vdi");
    let ps = p.to_string_lossy().into_owned();
    qemu_img_ok(&["create", "-q", "-f", "vdi", &ps, "64M"]);
    let mut b = std::fs::read(&p).unwrap();
    assert!(open_small(&b).is_ok(), "the untouched image");
    // blocks in image (byte 384): 2^20, a 4 MiB map in a 1 KiB file.
    b[384..388].copy_from_slice(&(1u32 << 20).to_le_bytes());
    match open_small(&b) {
        Err(e @ Error::Corrupt { .. }) => {
            assert!(e.to_string().contains("block map beyond the end"), "{e}")
        }
        Err(e) => panic!("sized before the range was checked: {e}"),
        Ok(()) => panic!("opened"),
    }
    // qemu opens it (the map past the end reads as zeroes: every block at data index 0)
    // but its check reports the corruption; we refuse it at open.
    std::fs::write(&p, &b).unwrap();
    assert!(qemu_img(&["info", "-f", "vdi", &ps]).status.success());
    let check = qemu_img(&["check", "-f", "vdi", "--output=json", &ps]);
    assert_eq!(
        check.status.code(),
        Some(2),
        "qemu-img check finds corruption"
    );
}
