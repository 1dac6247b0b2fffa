//! The command lines of issue 15.1 and 15.2 as a user types them: a truncated
//! monolithicSparse VMDK is refused as qemu refuses it (nothing written), and writes to a
//! differencing VHD leave its parent name intact.

use diskimg_testutil::{qemu_img, qemu_img_ok, tempdir};

use crate::{code, diskimg, diskimg_ok, s};

#[test]
fn truncated_vmdk_is_refused_before_any_write() {
    let dir = tempdir();
    let t = dir.path().join("t.vmdk");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        s(&t),
        "100G",
    ]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&t)
        .unwrap()
        .set_len(10 << 20)
        .unwrap();
    let before = std::fs::read(&t).unwrap();
    let o = diskimg(&[
        "io",
        "-f",
        "vmdk",
        "-c",
        "write -P 0x11 0 64k",
        "-c",
        "write -P 0x22 60896M 64k",
        "-c",
        "write -P 0x33 60897M 64k",
        "-c",
        "read -P 0x22 60896M 64k",
        s(&t),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(code(&o), 0);
    assert!(
        err.contains("File truncated, expecting at least 13172736 bytes"),
        "{err}"
    );
    let q = qemu_img(&["info", s(&t)]);
    assert!(String::from_utf8_lossy(&q.stderr).contains("expecting at least 13172736 bytes"));
    assert!(std::fs::read(&t).unwrap() == before);
}

#[test]
fn differencing_vhd_keeps_its_parent_name() {
    let dir = tempdir();
    let (base, over) = (dir.path().join("base.vpc"), dir.path().join("over.vpc"));
    diskimg_ok(&["create", "-q", "-f", "vpc", s(&base), "64M"]);
    diskimg_ok(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-b",
        "base.vpc",
        "-F",
        "vpc",
        s(&over),
    ]);
    diskimg_ok(&["io", "-c", "write -P 0xab 0 512", s(&over)]);
    let info = diskimg_ok(&["info", "--output=json", s(&over)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["backing-filename"], "base.vpc", "{info}");
    diskimg_ok(&[
        "io",
        "-c",
        "read -P 0xab 0 512",
        "-c",
        "read -P 0 512 512",
        s(&over),
    ]);
}
