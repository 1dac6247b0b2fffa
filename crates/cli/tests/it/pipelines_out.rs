//! Targets that are not seekable: `convert … -` to stdout as raw, qcow2
//! (`qcow2-to-stdout.py`'s layout) and fixed VHD (Azure's whole-MiB rule), judged by
//! qemu-img after `> file`, and piped back into diskimg.

use std::path::Path;
use std::process::{Command, Stdio};

use diskimg_testutil::{
    assert_qemu_check_clean, qemu_compare, qemu_img_ok, qemu_info_json, tempdir,
};

use crate::{diskimg_ok, qemu_raw, s};

/// Runs `diskimg ARGS` with stdout into `out`; returns (success, stderr).
fn to_file(args: &[&str], out: &Path) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_diskimg"))
        .args(args)
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn qcow2_raw_and_vhd_to_stdout() {
    let dir = tempdir();
    // Not a whole number of MiB, data near both ends and a written-zero cluster.
    let raw = qemu_raw(
        dir.path(),
        "d.raw",
        "33793k",
        &[
            "write -P 0x31 0 100k",
            "write -z 1M 64k",
            "write -P 0x32 17M 1M",
            "write -P 0x33 33791k 1k",
        ],
    );
    let q = dir.path().join("d.qcow2");
    qemu_img_ok(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&q),
    ]);
    for src in [&raw, &q] {
        for cs in ["65536", "4096", "2M"] {
            let out = dir.path().join("o.qcow2");
            let (ok, err) = to_file(
                &[
                    "convert",
                    "-O",
                    "qcow2",
                    "-o",
                    &format!("cluster_size={cs}"),
                    s(src),
                    "-",
                ],
                &out,
            );
            assert!(ok, "{err}");
            assert_qemu_check_clean(&out, "qcow2");
            assert!(
                qemu_compare(&raw, "raw", &out, "qcow2"),
                "{} cluster_size={cs}",
                s(src)
            );
            // Metadata first, data in order: readable back from a pipe.
            let back = dir.path().join("back.raw");
            let st = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "cat {} | {} convert -O raw - {}",
                    s(&out),
                    env!("CARGO_BIN_EXE_diskimg"),
                    s(&back)
                ))
                .status()
                .unwrap();
            assert!(st.success());
            assert!(qemu_compare(&raw, "raw", &back, "raw"));
        }
        let out = dir.path().join("o.raw");
        let (ok, err) = to_file(&["convert", "-p", "-O", "raw", s(src), "-"], &out);
        assert!(ok, "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&raw).unwrap());
    }
    // Azure: a fixed VHD whose size is whole MiB, exact in the footer (force_size).
    let vhd = dir.path().join("o.vhd");
    let (ok, err) = to_file(
        &[
            "convert",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed,azure_align=on",
            s(&q),
            "-",
        ],
        &vhd,
    );
    assert!(ok, "{err}");
    let info = qemu_info_json(&vhd, "vpc");
    let size = info["virtual-size"].as_u64().unwrap();
    assert_eq!(size, 34 << 20);
    assert_eq!(std::fs::metadata(&vhd).unwrap().len(), size + 512);
    let bytes = std::fs::read(&vhd).unwrap();
    let footer = &bytes[bytes.len() - 512..];
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "fixed disk type"
    );
    assert_eq!(
        u64::from_be_bytes(footer[48..56].try_into().unwrap()) % (1 << 20),
        0
    );
    let o = qemu_img_ok(&["compare", "-f", "raw", "-F", "vpc", s(&raw), s(&vhd)]);
    assert!(o.contains("identical"), "{o}");
}

#[test]
fn stream_sources_to_stdout() {
    let dir = tempdir();
    let raw = qemu_raw(
        dir.path(),
        "d.raw",
        "24M",
        &["write -P 0x44 0 2M", "write -P 0x45 23M 1M"],
    );
    let gz = dir.path().join("d.raw.gz");
    let o = Command::new("gzip").arg("-c").arg(&raw).output().unwrap();
    std::fs::write(&gz, o.stdout).unwrap();
    // A stream of unknown length to raw and to a fixed VHD.
    let out = dir.path().join("o.raw");
    let (ok, err) = to_file(&["convert", "-O", "raw", s(&gz), "-"], &out);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&raw).unwrap());
    let vhd = dir.path().join("o.vhd");
    let (ok, err) = to_file(
        &["convert", "-O", "vpc", "-o", "force_size=on", s(&gz), "-"],
        &vhd,
    );
    assert!(ok, "{err}");
    let o = qemu_img_ok(&["compare", "-f", "raw", "-F", "vpc", s(&raw), s(&vhd)]);
    assert!(o.contains("identical"), "{o}");
    // qcow2 needs two passes: refused for a stream, naming it and the way out.
    let (ok, err) = to_file(
        &["convert", "-O", "qcow2", s(&gz), "-"],
        &dir.path().join("x"),
    );
    assert!(!ok);
    assert!(
        err.contains(s(&gz)) && err.contains("seekable source"),
        "{err}"
    );
    let (ok, err) = to_file(
        &["convert", "-O", "vdi", s(&raw), "-"],
        &dir.path().join("x"),
    );
    assert!(!ok && err.contains("stdout"), "{err}");
    let _ = diskimg_ok;
}
