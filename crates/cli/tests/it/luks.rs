//! The standalone luks format through the CLI against qemu-img/qemu-io: `info -f luks`
//! without a key (as Cinder runs it), create, convert in and out, io with a key.

use std::process::Command;

use diskimg_testutil::{qemu_img_ok, tempdir};

use crate::{diskimg, diskimg_ok, s};

const OBJ: &str = "secret,id=sec0,data=luks-cli-test";

#[test]
fn info_create_convert_and_io() {
    let dir = tempdir();
    let ours = dir.path().join("ours.luks");
    let out = diskimg_ok(&[
        "create",
        "-f",
        "luks",
        "--object",
        OBJ,
        "-o",
        "key-secret=sec0,iter-time=10",
        s(&ours),
        "4M",
    ]);
    assert!(out.starts_with("Formatting"), "{out}");
    assert!(
        out.contains("fmt=luks size=4194304 key-secret=sec0 iter-time=10"),
        "{out}"
    );
    // qemu-img info -f luks needs no key; ours neither, and both say the same.
    for info in [
        qemu_img_ok(&["info", "-f", "luks", s(&ours)]),
        diskimg_ok(&["info", "-f", "luks", s(&ours)]),
    ] {
        assert!(info.contains("file format: luks"), "{info}");
        assert!(info.contains("encrypted: yes"), "{info}");
        assert!(info.contains("cipher alg: aes-256"), "{info}");
        assert!(info.contains("payload offset: 2068480"), "{info}");
    }
    let q = qemu_img_ok(&["info", "--output=json", "-f", "luks", s(&ours)]);
    let d = diskimg_ok(&["info", "--output=json", "-f", "luks", s(&ours)]);
    let (q, d): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&q).unwrap(),
        serde_json::from_str(&d).unwrap(),
    );
    assert_eq!(
        q["format-specific"]["data"]["uuid"],
        d["format-specific"]["data"]["uuid"]
    );
    assert_eq!(q["virtual-size"], d["virtual-size"]);
    // Probed as luks, as qemu does.
    assert!(diskimg_ok(&["info", s(&ours)]).contains("file format: luks"));
    // Written through diskimg io with a key; qemu-io reads it.
    let opts = format!("driver=luks,file.filename={},key-secret=sec0", s(&ours));
    diskimg_ok(&[
        "io",
        "--object",
        OBJ,
        "--image-opts",
        "-c",
        "write -P 0x3c 1000 70000",
        &opts,
    ]);
    let o = Command::new("qemu-io")
        .args([
            "--object",
            OBJ,
            "--image-opts",
            "-c",
            "read -P 0x3c 1000 70000",
            &opts,
        ])
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !so.contains("Pattern"), "{so}");
    // Without a key, I/O is refused with qemu's message.
    let o = diskimg(&["io", "-f", "luks", "-c", "read 0 512", s(&ours)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Parameter 'key-secret' is required for cipher"),
        "{err}"
    );
    // convert luks -> luks and luks -> raw agree with qemu.
    let copy = dir.path().join("copy.luks");
    diskimg_ok(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        &opts,
        "-O",
        "luks",
        "-o",
        "key-secret=sec0,iter-time=10",
        s(&copy),
    ]);
    let copy_opts = format!("driver=luks,file.filename={},key-secret=sec0", s(&copy));
    qemu_img_ok(&[
        "compare",
        "--object",
        OBJ,
        "--image-opts",
        &opts,
        &copy_opts,
    ]);
    let raw = dir.path().join("plain.raw");
    diskimg_ok(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        &copy_opts,
        "-O",
        "raw",
        s(&raw),
    ]);
    let raw_opts = format!("driver=raw,file.filename={}", s(&raw));
    qemu_img_ok(&["compare", "--object", OBJ, "--image-opts", &raw_opts, &opts]);
}
