//! Memory proportional to the file: the BAT a dynamic header claims is checked against
//! the file before it is allocated. Images are opened under a 1 MiB metadata limit; a
//! BAT past the end of the file must be refused as corrupt, not as over the limit
//! (which would mean its buffer was sized first).

use diskimg_blockio::Error;
use diskimg_testutil::{open_under_limit, qemu_img, qemu_img_ok, tempdir};

fn open_small(img: &[u8]) -> diskimg_blockio::Result<()> {
    open_under_limit(&diskimg_vhd::DRIVER, img, 1 << 20)
}

#[test]
fn a_bat_past_the_end_of_the_file_is_refused_before_allocation() {
    let dir = tempdir();
    let p = dir.path().join("t.vhd");
    let ps = p.to_string_lossy().into_owned();
    qemu_img_ok(&["create", "-q", "-f", "vpc", &ps, "64M"]);
    let mut b = std::fs::read(&p).unwrap();
    assert!(open_small(&b).is_ok(), "the untouched image");
    // Max Table Entries (dynamic header at 512, byte 28): 2^20, a 4 MiB BAT in a
    // 2.5 KiB file.
    b[512 + 28..512 + 32].copy_from_slice(&(1u32 << 20).to_be_bytes());
    match open_small(&b) {
        Err(e @ Error::Corrupt { .. }) => {
            assert!(e.to_string().contains("BAT beyond the end"), "{e}")
        }
        Err(e) => panic!("sized before the range was checked: {e}"),
        Ok(()) => panic!("opened"),
    }
    // qemu refuses it too (its free-space pointer, after the BAT, is past the end).
    std::fs::write(&p, &b).unwrap();
    let q = qemu_img(&["info", "-f", "vpc", &ps]);
    let err = String::from_utf8_lossy(&q.stderr);
    assert!(
        !q.status.success() && err.contains("points after the end of file"),
        "{err}"
    );
}
