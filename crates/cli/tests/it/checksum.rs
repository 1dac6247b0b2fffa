//! `diskimg checksum`: one digest per guest content, whatever the format; equal to
//! blksum's construction (an independent Python implementation here) and to
//! sha256sum of the raw image.

use std::process::Command;

use diskimg_testutil::{qemu_img_ok, tempdir};

use crate::{diskimg, diskimg_ok, qemu_raw, s};

/// blkhash (blksum 0.10+): sha256 over 64 KiB blocks, then the little-endian length;
/// written here from the published description, independently of the Rust code.
const BLKHASH_PY: &str = r#"
import hashlib, struct, sys
B = 65536
outer = hashlib.sha256()
n = 0
with open(sys.argv[1], 'rb') as f:
    while True:
        b = f.read(B)
        if not b:
            break
        outer.update(hashlib.sha256(b).digest())
        n += len(b)
outer.update(struct.pack('<Q', n))
print(outer.hexdigest())
"#;

fn python_blkhash(path: &std::path::Path) -> String {
    let o = Command::new("python3")
        .args(["-c", BLKHASH_PY, s(path)])
        .output()
        .expect("run python3");
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn digest(args: &[&str]) -> String {
    let out = diskimg_ok(args);
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn same_digest_in_every_format() {
    let dir = tempdir();
    // Data, written zeroes, a hole and an unaligned tail (size not a block multiple).
    let raw = qemu_raw(
        dir.path(),
        "a.raw",
        "5243392",
        &[
            "write -P 0x5a 0 300k",
            "write -z 1M 192k",
            "write -P 0x11 2M 4k",
            "write -P 0x22 5242880 512",
        ],
    );
    let expect = python_blkhash(&raw);
    let sha = Command::new("sha256sum").arg(&raw).output().unwrap();
    let sha = String::from_utf8(sha.stdout).unwrap();
    let sha = sha.split_whitespace().next().unwrap().to_string();
    let mut images = vec![(raw.clone(), "raw")];
    for (fmt, opts) in [
        ("qcow2", ""),
        ("vmdk", ""),
        ("vdi", ""),
        ("vhdx", ""),
        ("vpc", "force_size=on"),
    ] {
        let p = dir.path().join(format!("a.{fmt}"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&raw), s(&p)]);
        qemu_img_ok(&args);
        images.push((p, fmt));
    }
    let zc = dir.path().join("c.qcow2");
    qemu_img_ok(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&zc),
    ]);
    images.push((zc, "qcow2"));
    for (p, fmt) in &images {
        for m in ["1", "3"] {
            let got = digest(&["checksum", "-f", fmt, "-m", m, s(p)]);
            assert_eq!(got, expect, "{fmt} with -m {m}");
        }
        let got = digest(&["checksum", "--algorithm", "sha256", s(p)]);
        assert_eq!(got, sha, "sha256 of {fmt}");
    }
    // blake3 of the same guest bytes is the same in every format too.
    let b3: Vec<String> = images
        .iter()
        .map(|(p, _)| digest(&["checksum", "-a", "blake3", s(p)]))
        .collect();
    assert!(b3.windows(2).all(|w| w[0] == w[1]), "{b3:?}");
    assert_ne!(b3[0], sha);
}

#[test]
fn json_output_and_errors() {
    let dir = tempdir();
    let raw = qemu_raw(dir.path(), "z.raw", "1G", &[]);
    let out = diskimg_ok(&["checksum", "--output", "json", s(&raw)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // blkhash's published vector for 1 GiB of zeroes (test_sparse_large).
    assert_eq!(
        v["checksum"],
        "c6d6562c3074a2caa0ceea3e1f460f3af678c792ed05e64157eb51e68ae5260d"
    );
    assert_eq!(v["algorithm"], "blkhash-sha256");
    assert_eq!(v["block-size"], 65536);
    assert_eq!(v["virtual-size"], 1u64 << 30);
    assert_eq!(v["format"], "raw");
    let o = diskimg(&["checksum", "-a", "md5", s(&raw)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Unknown checksum algorithm 'md5'"));
    let o = diskimg(&["checksum", s(&dir.path().join("missing"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Could not open"));
}
