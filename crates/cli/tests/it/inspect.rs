//! `diskimg inspect`: exit codes (0 safe, 1 unsafe, 2 cannot tell), the JSON fields,
//! and, watched with strace, that no file but the image is ever opened.

use std::path::Path;
use std::process::Command;

use diskimg_testutil::{qemu_img_ok, tempdir};
use serde_json::Value;

use crate::{code, diskimg, s};

fn json(args: &[&str]) -> (Value, i32) {
    let o = diskimg(args);
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (v, code(&o))
}

#[test]
fn exit_codes_and_json() {
    let dir = tempdir();
    let d = dir.path();
    let q = d.join("q.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&q), "1M"]);
    let (v, c) = json(&["inspect", "--output=json", s(&q)]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(v["verdict"], "safe");
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["detected-format"], "qcow2");
    assert_eq!(v["declared-format"], Value::Null);
    assert_eq!(v["virtual-size"], 1 << 20);
    assert_eq!(v["signatures"][0]["name"], "qcow2");
    for k in [
        "file-size",
        "references",
        "encryption",
        "unknown-features",
        "findings",
    ] {
        assert!(!v[k].is_null(), "{k} missing: {v}");
    }
    // Unsafe: a backing file, named in the reasons.
    let b = d.join("b.qcow2");
    crate::qemu_overlay("qcow2", s(&q), "qcow2", s(&b));
    let (v, c) = json(&["inspect", "--output=json", s(&b)]);
    assert_eq!(c, 1);
    assert_eq!(v["verdict"], "unsafe");
    assert_eq!(v["references"][0]["kind"], "backing-file");
    assert_eq!(v["references"][0]["name"], s(&q));
    assert_eq!(v["findings"][0]["severity"], "unsafe");
    // Declared as raw: a mismatch.
    let o = diskimg(&["inspect", "-f", "raw", s(&q)]);
    assert_eq!(code(&o), 1);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("verdict: unsafe") && text.contains("format-mismatch"),
        "{text}"
    );
    // Cannot tell: a format without an inspector, and a missing file.
    let bochs = d.join("x.bochs");
    let mut head = b"Bochs Virtual HD Image\0".to_vec();
    head.resize(512, 0);
    std::fs::write(&bochs, head).unwrap();
    assert_eq!(code(&diskimg(&["inspect", s(&bochs)])), 2);
    let o = diskimg(&["inspect", s(&d.join("missing"))]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Could not open"));
}

/// The paths below `dir` that `diskimg ARGS` opens or stats, as strace sees them.
fn opened(dir: &Path, args: &[&str]) -> Vec<String> {
    let log = tempdir();
    let trace = log.path().join("trace");
    let st = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=open,openat,openat2,stat,statx,newfstatat,lstat",
        ])
        .arg("-o")
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_diskimg"))
        .args(args)
        .output()
        .expect("strace is needed (apt-get install strace)");
    assert!(st.status.code().is_some());
    let text = std::fs::read_to_string(&trace).unwrap();
    text.lines()
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect()
}

#[test]
fn inspect_opens_nothing_but_the_image() {
    let dir = tempdir();
    let d = dir.path();
    let secret = d.join("secret");
    std::fs::write(&secret, [1u8; 4096]).unwrap();
    let q = d.join("q.qcow2");
    let o = format!("data_file={}", s(&d.join("data.raw")));
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &o,
        "-b",
        s(&secret),
        "-F",
        "raw",
        s(&q),
    ]);
    let v = d.join("v.vmdk");
    let text = format!(
        "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 8 FLAT \"{}\" 0\nparentFileNameHint=\"{}\"\n",
        s(&secret),
        s(&secret)
    );
    std::fs::write(&v, text).unwrap();
    for img in [&q, &v] {
        for fmt in [None, Some("raw")] {
            let mut args = vec!["inspect"];
            if let Some(f) = fmt {
                args.extend(["-f", f]);
            }
            args.push(s(img));
            let paths = opened(d, &args);
            let others: Vec<&String> = paths
                .iter()
                .filter(|p| Path::new(p.as_str()) != img.as_path())
                .collect();
            assert!(others.is_empty(), "{args:?} touched {others:?}");
            assert!(
                paths.iter().any(|p| Path::new(p) == img.as_path()),
                "{paths:?}"
            );
        }
    }
}
