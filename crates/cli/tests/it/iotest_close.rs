//! iotest `qemu-img-close-errors`: `qemu-img bitmap` on `json:{…}` names (a qcow2 image
//! on a size-limited `raw` node), judged by qemu-img on the same files.

use diskimg_testutil::{qemu_img, qemu_img_ok, tempdir};

use crate::iotest_cases::img;
use crate::{code, diskimg, s};

/// qcow2 on a `raw` node of `size` bytes over `file`, as the iotest names it.
fn raw_node_json(file: &str, size: u64) -> String {
    format!(
        r#"json:{{"driver": "qcow2", "file": {{"driver": "raw", "size": {size},
            "file": {{"driver": "file", "filename": "{file}"}}}}}}"#
    )
}

/// The bitmaps qemu-img sees in `file` and whether it checks clean.
fn bitmaps_seen(file: &str) -> (String, bool) {
    let info = qemu_img_ok(&["info", "--output=json", file]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("info json");
    let check = qemu_img(&["check", file]);
    (
        v["format-specific"]["data"]["bitmaps"].to_string(),
        check.status.success(),
    )
}

/// `bitmap --add` and `bitmap --merge SRC -b TOP` take a `json:` name with a raw size
/// node (they opened it as a path before): same exits, stderr and bitmaps as qemu-img.
#[test]
fn bitmap_add_merge_on_json_raw_node_as_qemu() {
    let run = |qemu: bool| {
        let d = tempdir();
        let base = img(d.path(), "base.qcow2", "qcow2", "64M");
        let top = img(d.path(), "top.qcow2", "qcow2", "64M");
        qemu_img_ok(&["bitmap", "--add", &top, "src"]);
        // The raw node's size must fit the file, as in the iotest (`truncate 128M`).
        let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
        f.set_len(16 << 20).unwrap();
        let json = raw_node_json(&base, 16 << 20);
        let steps: [Vec<&str>; 2] = [
            vec!["bitmap", "--add", &json, "b1"],
            vec!["bitmap", "--merge", "src", "-b", &top, &json, "b1"],
        ];
        let mut out = Vec::new();
        for args in &steps {
            let o = if qemu { qemu_img(args) } else { diskimg(args) };
            let err = String::from_utf8_lossy(&o.stderr)
                .replace(s(d.path()), "DIR")
                .replacen("diskimg: ", "qemu-img: ", 1);
            out.push((code(&o), err));
        }
        (out, bitmaps_seen(&base))
    };
    let (q, d) = (run(true), run(false));
    assert_eq!(d, q);
    assert!(q.1.0.contains("\"b1\""), "{q:?}");
}
