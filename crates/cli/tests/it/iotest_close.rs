//! iotest `qemu-img-close-errors`: `qemu-img bitmap` on `json:{…}` names (a qcow2 image
//! on a size-limited `raw` node), judged by qemu-img on the same files.

use diskimg_testutil::{qemu_create_overlay, qemu_img, qemu_img_ok, tempdir};

use crate::iotest_cases::img;
use crate::{code, diskimg, s};

/// qcow2 on a `raw` node of `size` bytes over `file`, as the iotest names it.
pub(crate) fn raw_node_json(file: &str, size: u64) -> String {
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

/// Runs `steps` (qemu-img arguments, `{J}` for the base's `json:` name, `{T}` for the
/// top image) with qemu-img or diskimg on a base of `base_len` bytes on a raw node of
/// that size (made by `setup`, which gets the base's and the top's paths); returns each
/// step's exit code and stderr, and what `qemu-img check` says of the base.
pub(crate) fn steps_on_full_node(
    qemu: bool,
    setup: &dyn Fn(&str, &str) -> u64,
    steps: &[&[&str]],
) -> (Vec<(i32, String)>, String) {
    let d = tempdir();
    let base = s(&d.path().join("t.qcow2.base")).to_string();
    let top = s(&d.path().join("t.qcow2")).to_string();
    let len = setup(&base, &top);
    let json = raw_node_json(&base, len);
    let mut out = Vec::new();
    for step in steps {
        let args: Vec<String> = step
            .iter()
            .map(|a| a.replace("{J}", &json).replace("{T}", &top))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = if qemu {
            qemu_img(&args)
        } else {
            diskimg(&args)
        };
        let err = String::from_utf8_lossy(&o.stderr)
            .replace(s(d.path()), "DIR")
            .replace("diskimg: ", "qemu-img: ");
        out.push((code(&o), err));
    }
    // Clean, and where the file ends (qemu's copy fragments differently), and the
    // bitmaps with their flags.
    let check = qemu_img(&["check", &base]);
    let text = String::from_utf8_lossy(&check.stdout);
    let kept: Vec<&str> = text.lines().filter(|l| !l.contains("fragmented")).collect();
    let (bitmaps, _) = bitmaps_seen(&base);
    (out, format!("{}\n{bitmaps}", kept.join("\n")))
}

/// Replaces qemu's generated node names (`#block123`), as the iotests' filter does.
pub(crate) fn node_names(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i]);
        out.push_str("NODE_NAME");
        rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// A `bitmap --merge` whose merged bits cannot be stored (the raw node under the base is
/// full): qemu-img's close error — "Lost persistent bitmaps …" around "Error while
/// closing the image: Invalid argument", exit 1 — not the operation's.
#[test]
fn bitmap_merge_store_failure_is_a_close_error_as_qemu() {
    let setup = |base: &str, top: &str| {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", base, "1G"]);
        qemu_img_ok(&["bitmap", "--add", base, "b1"]);
        let f = std::fs::OpenOptions::new().write(true).open(base).unwrap();
        let len = f.metadata().unwrap().len().div_ceil(65536) * 65536;
        f.set_len(len).unwrap();
        qemu_img_ok(&["create", "-q", "-f", "qcow2", top, "1G"]);
        qemu_img_ok(&["bitmap", "--add", top, "src"]);
        let io = crate::qemu_io_raw(&["-c", "write 0 1m", top]);
        assert!(io.status.success(), "{io:?}");
        len
    };
    let steps: &[&[&str]] = &[&["bitmap", "--merge", "src", "-b", "{T}", "{J}", "b1"]];
    let q = steps_on_full_node(true, &setup, steps);
    let d = steps_on_full_node(false, &setup, steps);
    let filtered = |(v, c): &(Vec<(i32, String)>, String)| {
        let v: Vec<(i32, String)> = v.iter().map(|(k, e)| (*k, node_names(e))).collect();
        (v, c.clone())
    };
    assert_eq!(filtered(&d), filtered(&q));
    assert!(q.0[0].1.contains("Lost persistent bitmaps"), "{q:?}");
}

/// `commit` into a base on a size-limited raw node that the data fits: the qcow2
/// allocation reserve must not need the file to grow past the node (it did: ENOSPC,
/// "Block job failed"), as in qemu.
#[test]
fn commit_into_size_limited_raw_node_as_qemu() {
    let setup = |base: &str, top: &str| {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", base, "1G"]);
        let len = 32u64 << 20;
        let f = std::fs::OpenOptions::new().write(true).open(base).unwrap();
        f.set_len(len).unwrap();
        let json = raw_node_json(base, len);
        crate::qemu_overlay("qcow2", &json, "qcow2", top);
        let io = crate::qemu_io_raw(&["-c", "write 0 30m", top]);
        assert!(io.status.success(), "{io:?}");
        len
    };
    let steps: &[&[&str]] = &[&["commit", "-q", "-d", "{T}"]];
    let q = steps_on_full_node(true, &setup, steps);
    let d = steps_on_full_node(false, &setup, steps);
    assert_eq!(d, q);
    assert_eq!(q.0[0].0, 0, "{q:?}");
}

/// The iotest's own scenario on a smaller node (16 MiB, the same 32 clusters to spare):
/// `max` bitmaps in the base, a commit of a top that fills the node but for those
/// clusters, then `bitmap --add` and `--merge` on the `json:` name. qemu marks the
/// bitmaps in use in place at open and stores every one anew at close, its allocator
/// skipping gaps too short for a run: with 6 bitmaps the merge runs out of room on
/// 'good-bitmap', with 7 the commit already on 'stale-bitmap-7'. diskimg fails at the
/// same steps with the same lines and leaves the same bitmaps, flags and layout.
#[test]
fn bitmaps_run_out_of_room_where_qemus_do() {
    for max in [6, 7] {
        let setup = |base: &str, top: &str| {
            qemu_img_ok(&["create", "-q", "-f", "qcow2", base, "1G"]);
            for i in 1..=max {
                qemu_img_ok(&["bitmap", "--add", base, &format!("stale-bitmap-{i}")]);
            }
            let len = 16u64 << 20;
            let f = std::fs::OpenOptions::new().write(true).open(base).unwrap();
            f.set_len(len).unwrap();
            let json = raw_node_json(base, len);
            qemu_create_overlay(top, "qcow2", &json, "qcow2", None);
            qemu_img_ok(&["bitmap", "--add", top, "good-bitmap"]);
            let io = crate::qemu_io_raw(&["-c", "write 0 14m", top]);
            assert!(io.status.success(), "{io:?}");
            len
        };
        let steps: &[&[&str]] = &[
            &["commit", "-d", "{T}"],
            &["bitmap", "--add", "{J}", "good-bitmap"],
            &[
                "bitmap",
                "--merge",
                "good-bitmap",
                "-b",
                "{T}",
                "{J}",
                "good-bitmap",
            ],
        ];
        let filtered = |(v, c): (Vec<(i32, String)>, String)| {
            let v: Vec<(i32, String)> = v.iter().map(|(k, e)| (*k, node_names(e))).collect();
            (v, c)
        };
        let q = filtered(steps_on_full_node(true, &setup, steps));
        let d = filtered(steps_on_full_node(false, &setup, steps));
        assert_eq!(d, q, "{max} bitmaps");
        let failing = if max == 6 { 2 } else { 0 };
        assert_eq!(q.0[failing].0, 1, "{q:?}");
        assert!(q.0[failing].1.contains("No space left on device"), "{q:?}");
    }
}
