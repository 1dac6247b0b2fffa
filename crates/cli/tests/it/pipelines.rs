//! Sources that are not files: wrapped (gzip/xz/zstd/bzip2) images made by the real
//! command-line tools, stdin pipes, tar/OVA members, HTTP from nginx (ranges) and from
//! Python's http.server (no ranges, 503s first). Results are judged by qemu-img.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use diskimg_testutil::{qemu_compare, qemu_img_ok, tempdir};

use crate::servers::{nginx, python};
use crate::{diskimg, diskimg_ok, qemu_raw, s};

/// A 40 MiB raw image with data spread over it (beyond the stream's kept head) and a
/// qcow2 copy made by qemu-img.
fn images(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = qemu_raw(
        dir,
        "disk.raw",
        "40M",
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x11 20M 3M",
            "write -P 0x22 39M 512k",
        ],
    );
    let q = dir.join("disk.qcow2");
    qemu_img_ok(&["convert", "-q", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    (raw, q)
}

/// Compresses `src` with a command line tool (`gzip -c` …) into `dst`.
fn wrap(tool: &[&str], src: &Path, dst: &Path) {
    let out = std::fs::File::create(dst).unwrap();
    let st = Command::new(tool[0])
        .args(&tool[1..])
        .arg(src)
        .stdout(out)
        .status()
        .unwrap_or_else(|e| panic!("run {} ({e})", tool[0]));
    assert!(st.success());
}

const TOOLS: [(&str, &[&str]); 4] = [
    ("gz", &["gzip", "-c"]),
    ("xz", &["xz", "-T2", "-c"]),
    ("zst", &["zstd", "-q", "-c"]),
    ("bz2", &["bzip2", "-c"]),
];

fn sum(args: &[&str]) -> String {
    diskimg_ok(args)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn wrapped_files_convert_in_one_pass() {
    let dir = tempdir();
    let (raw, q) = images(dir.path());
    let want = sum(&["checksum", s(&raw)]);
    for (ext, tool) in TOOLS {
        for (img, fmt) in [(&raw, "raw"), (&q, "qcow2")] {
            let w = dir.path().join(format!("in.{fmt}.{ext}"));
            wrap(tool, img, &w);
            assert_eq!(sum(&["checksum", s(&w)]), want, "{fmt}.{ext}");
            for out_fmt in ["raw", "qcow2"] {
                let out = dir.path().join(format!("out.{out_fmt}"));
                diskimg_ok(&["convert", "-O", out_fmt, s(&w), s(&out)]);
                assert!(
                    qemu_compare(&raw, "raw", &out, out_fmt),
                    "{fmt}.{ext} -> {out_fmt}"
                );
                if out_fmt == "qcow2" {
                    diskimg_testutil::assert_qemu_check_clean(&out, "qcow2");
                }
            }
        }
    }
    // Multi-member gzip (two files concatenated) decodes as one stream.
    let half = dir.path().join("half");
    std::fs::write(&half, &std::fs::read(&raw).unwrap()[..20 << 20]).unwrap();
    let rest = dir.path().join("rest");
    std::fs::write(&rest, &std::fs::read(&raw).unwrap()[20 << 20..]).unwrap();
    let mut both = Vec::new();
    for p in [&half, &rest] {
        let o = Command::new("gzip").arg("-c").arg(p).output().unwrap();
        both.extend_from_slice(&o.stdout);
    }
    let multi = dir.path().join("multi.gz");
    std::fs::write(&multi, both).unwrap();
    assert_eq!(sum(&["checksum", s(&multi)]), want);
}

/// Runs diskimg with `stdin` from a file through a pipe (`cat FILE | diskimg …`).
fn piped(file: &Path, args: &[&str]) -> std::process::Output {
    let mut cat = Command::new("cat")
        .arg(file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_diskimg"))
        .args(args)
        .stdin(cat.stdout.take().unwrap())
        .output()
        .unwrap();
    cat.wait().unwrap();
    out
}

#[test]
fn stdin_pipes_and_errors() {
    let dir = tempdir();
    let (raw, q) = images(dir.path());
    let want = sum(&["checksum", s(&raw)]);
    let xz = dir.path().join("d.xz");
    wrap(&["xz", "-T2", "-c"], &raw, &xz);
    for src in [&raw, &q, &xz] {
        let out = piped(src, &["checksum", "-"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(&want));
        let dst = dir.path().join("p.qcow2");
        let out = piped(src, &["convert", "-O", "qcow2", "-", s(&dst)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(qemu_compare(&raw, "raw", &dst, "qcow2"));
    }
    // A regular file as stdin stays seekable (`diskimg info - < disk.qcow2`).
    let out = Command::new(env!("CARGO_BIN_EXE_diskimg"))
        .args(["info", "--output=json", "-"])
        .stdin(std::fs::File::open(&q).unwrap())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual-size"], 40 << 20);

    // Truncated and corrupt streams: a clear error naming the input and an offset, and
    // no target left behind.
    let bytes = std::fs::read(&xz).unwrap();
    let cut = dir.path().join("cut.xz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let corrupt = dir.path().join("bad.xz");
    std::fs::write(&corrupt, bad).unwrap();
    for src in [&cut, &corrupt] {
        let dst = dir.path().join("never.qcow2");
        let o = diskimg(&["convert", "-O", "qcow2", s(src), s(&dst)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(s(src)) && err.contains("offset"), "{err}");
        assert!(!dst.exists(), "partial target left behind for {}", s(src));
    }
    // A format that cannot be cut to the length found is refused before anything.
    let o = piped(
        &raw,
        &["convert", "-O", "vdi", "-", s(&dir.path().join("x.vdi"))],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown until its end"));
}

#[test]
fn tar_and_ova_members() {
    let dir = tempdir();
    let (raw, q) = images(dir.path());
    let want = sum(&["checksum", s(&raw)]);
    let vmdk = dir.path().join("disk1.vmdk");
    qemu_img_ok(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&raw),
        s(&vmdk),
    ]);
    std::fs::write(dir.path().join("vm.ovf"), "<Envelope/>").unwrap();
    let ova = dir.path().join("vm.ova");
    let st = Command::new("tar")
        .current_dir(dir.path())
        .args([
            "--format=ustar",
            "-cf",
            s(&ova),
            "vm.ovf",
            "disk1.vmdk",
            "disk.qcow2",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    // The first disk image, a named member, --member.
    assert_eq!(sum(&["checksum", s(&ova)]), want);
    assert_eq!(sum(&["checksum", &format!("{}#disk.qcow2", s(&ova))]), want);
    assert_eq!(sum(&["checksum", "--member", "disk1.vmdk", s(&ova)]), want);
    let o = diskimg(&["info", &format!("{}#nope.vmdk", s(&ova))]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no member 'nope.vmdk'"));
    // GCP's layout: disk.raw in an oldgnu tar.gz, read in one pass.
    let st = Command::new("tar")
        .current_dir(dir.path())
        .args(["--format=oldgnu", "-Sczf", "gcp.tar.gz", "disk.raw"])
        .status()
        .unwrap();
    assert!(st.success());
    let gcp = dir.path().join("gcp.tar.gz");
    let out = dir.path().join("gcp.qcow2");
    diskimg_ok(&["convert", "-O", "qcow2", s(&gcp), s(&out)]);
    let _ = q;
    assert!(qemu_compare(&raw, "raw", &out, "qcow2"));
}

#[test]
fn http_sources() {
    let dir = tempdir();
    let root = dir.path().join("www");
    std::fs::create_dir(&root).unwrap();
    let (raw, q) = images(&root);
    let gz = root.join("disk.raw.gz");
    wrap(&["gzip", "-c"], &raw, &gz);
    let want = sum(&["checksum", s(&raw)]);
    let work = dir.path().join("nginx");
    std::fs::create_dir(&work).unwrap();
    let ng = nginx(&root, &work);
    let out = dir.path().join("o.qcow2");
    for path in [
        "/img/disk.qcow2",
        "/old/disk.qcow2",
        "/img/disk.raw",
        "/img/disk.raw.gz",
    ] {
        let url = format!("{}{path}", ng.base);
        assert_eq!(sum(&["checksum", &url]), want, "{url}");
        diskimg_ok(&["convert", "-O", "qcow2", &url, s(&out)]);
        assert!(qemu_compare(&raw, "raw", &out, "qcow2"), "{url}");
    }
    let info = diskimg_ok(&[
        "info",
        "--output=json",
        &format!("{}/img/disk.qcow2", ng.base),
    ]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["format"], "qcow2");
    // A bearer token through --header; without it the server's 403 is named.
    let url = format!("{}/auth/disk.qcow2", ng.base);
    let o = diskimg(&["info", &url]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        sum(&["checksum", "--header", "Authorization: Bearer t0ken", &url]),
        want
    );
    // -n into an existing file (a block device works the same way) from a URL.
    let existing = dir.path().join("existing.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&existing), "40M"]);
    let url = format!("{}/img/disk.raw.gz", ng.base);
    diskimg_ok(&[
        "convert",
        "-n",
        "-O",
        "raw",
        &format!("{}/img/disk.qcow2", ng.base),
        s(&existing),
    ]);
    assert!(qemu_compare(&raw, "raw", &existing, "raw"));
    // A stream of unknown length into an existing target (-n): copied until it ends,
    // over what the target held; one longer than the target fails naming it.
    std::fs::write(&existing, vec![0xeeu8; 48 << 20]).unwrap();
    diskimg_ok(&["convert", "-n", "-O", "raw", &url, s(&existing)]);
    let got = std::fs::read(&existing).unwrap();
    assert_eq!(got.len(), 48 << 20);
    assert!(
        got[..40 << 20] == std::fs::read(&raw).unwrap()[..],
        "the stream's bytes"
    );
    assert!(
        got[40 << 20..].iter().all(|&b| b == 0xee),
        "bytes past the stream's end were changed"
    );
    let small = dir.path().join("small.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&small), "30M"]);
    let o = diskimg(&["convert", "-n", "-O", "qcow2", &url, s(&small)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is longer than the target"),
        "{err}"
    );
    assert!(small.exists(), "an existing target is never removed");
    let o = diskimg(&["info", &format!("{}/img/missing.raw", ng.base)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("404"));

    // A server that ignores ranges and fails twice first: retried, then read front to back.
    let py = python(&root, 2);
    for name in ["disk.qcow2", "disk.raw.gz"] {
        let url = format!("{}/{name}", py.base);
        diskimg_ok(&["convert", "-O", "raw", &url, s(&dir.path().join("o.raw"))]);
        assert!(
            qemu_compare(&raw, "raw", &dir.path().join("o.raw"), "raw"),
            "{url}"
        );
    }
    let _ = q;
}
