//! `bench` side by side with `qemu-img bench`: same output lines (but the time), same
//! bytes written with `-w`, same refusals.

use std::path::Path;

use diskimg_testutil::{assert_qemu_check_clean, qemu_compare, qemu_img, qemu_img_ok, tempdir};

use crate::{code, diskimg, s};

/// The output of a bench run without its timing line.
fn header(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|l| !l.starts_with("Run completed in "))
        .map(str::to_string)
        .collect()
}

fn pair(dir: &Path, fmt: &str, size: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let q = dir.join(format!("q.{fmt}"));
    let d = dir.join(format!("d.{fmt}"));
    for p in [&q, &d] {
        qemu_img_ok(&["create", "-q", "-f", fmt, s(p), size]);
    }
    (q, d)
}

#[test]
fn writes_match_qemu_bench() {
    let dir = tempdir();
    let runs: &[&[&str]] = &[
        &[
            "-w",
            "--pattern=0x33",
            "-c",
            "40",
            "-d",
            "3",
            "-o",
            "1024",
            "-S",
            "8192",
        ],
        // A flush interval, octal pattern.
        &[
            "-w",
            "--pattern=017",
            "-c",
            "60",
            "-d",
            "8",
            "-s",
            "64k",
            "--flush-interval=16",
        ],
        &[
            "-w",
            "--pattern=200",
            "-c",
            "50",
            "-s",
            "3000",
            "-S",
            "0",
            "-d",
            "1",
            "--no-drain",
            "--flush-interval=4",
        ],
    ];
    for fmt in ["raw", "qcow2", "vmdk", "vdi", "vpc"] {
        let (q, d) = pair(dir.path(), fmt, "4M");
        // An aligned wrap past the end (vpc's CHS-rounded size is not a multiple of 64k).
        let wrap: &[&str] = &["-w", "--pattern=1", "-c", "100", "-s", "64k", "-d", "2"];
        let extra = if fmt == "vpc" { None } else { Some(wrap) };
        for args in runs.iter().copied().chain(extra) {
            let mut qa = vec!["bench", "-f", fmt];
            qa.extend_from_slice(args);
            qa.push(s(&q));
            let mut da = qa.clone();
            *da.last_mut().unwrap() = s(&d);
            let qo = qemu_img(&qa);
            let dout = diskimg(&da);
            assert!(
                qo.status.success(),
                "{qa:?}: {}",
                String::from_utf8_lossy(&qo.stderr)
            );
            assert!(
                dout.status.success(),
                "{da:?}: {}",
                String::from_utf8_lossy(&dout.stderr)
            );
            assert_eq!(header(&dout.stdout), header(&qo.stdout), "{fmt} {args:?}");
            let last = String::from_utf8_lossy(&dout.stdout);
            assert!(
                last.lines()
                    .last()
                    .unwrap()
                    .starts_with("Run completed in "),
                "{last}"
            );
            assert!(
                qemu_compare(&q, fmt, &d, fmt),
                "{fmt} {args:?}: content differs"
            );
        }
        if fmt == "qcow2" || fmt == "vmdk" || fmt == "vdi" {
            assert_qemu_check_clean(&d, fmt);
        }
    }
}

#[test]
fn reads_match_qemu_bench() {
    let dir = tempdir();
    let (q, _) = pair(dir.path(), "qcow2", "1M");
    for args in [
        vec!["-c", "1000"],
        vec![
            "-c", "10", "-d", "1", "-s", "512", "-S", "1024", "-o", "4096", "-t", "none", "-n",
            "-U",
        ],
        vec!["-c", "5", "-i", "threads", "-q"],
    ] {
        let mut a = vec!["bench", "-f", "qcow2"];
        a.extend_from_slice(&args);
        a.push(s(&q));
        let qo = qemu_img(&a);
        let dout = diskimg(&a);
        assert!(qo.status.success() && dout.status.success(), "{a:?}");
        assert_eq!(header(&dout.stdout), header(&qo.stdout), "{a:?}");
    }
}

#[test]
fn refusals_match_qemu_bench() {
    let dir = tempdir();
    let (q, _) = pair(dir.path(), "raw", "64k");
    let cases: &[&[&str]] = &[
        &["-c", "0"],
        &["-c", "x"],
        &["-d", "0"],
        &["-s", "0"],
        &["-o", "x"],
        &["-o", "-1"],
        &["-S", "x"],
        &["--pattern=300"],
        &["--pattern=x"],
        &["--flush-interval=4"],
        &["-w", "--flush-interval=8", "-d", "16"],
        &["-w", "--flush-interval=x"],
        &["-t", "bogus"],
        &["-i", "foo"],
        // 10.0.2 wraps offsets modulo the image size: a request crosses the end.
        &["-w", "-c", "40", "-s", "3000"],
        // A first request beyond the end.
        &["-c", "1", "-o", "2M"],
    ];
    for args in cases {
        let mut a = vec!["bench", "-f", "raw"];
        a.extend_from_slice(args);
        a.push(s(&q));
        let qo = qemu_img(&a);
        let dout = diskimg(&a);
        assert_eq!(code(&qo), 1, "qemu {a:?}");
        assert_eq!(code(&dout), 1, "diskimg {a:?}");
        let qe = String::from_utf8_lossy(&qo.stderr);
        let de = String::from_utf8_lossy(&dout.stderr);
        let qe = qe.lines().last().unwrap().trim_start_matches("qemu-img: ");
        let de = de.lines().last().unwrap().trim_start_matches("diskimg: ");
        if qe.starts_with("Failed request") {
            assert!(de.starts_with("Failed request: "), "{a:?}: {de}");
        } else {
            assert_eq!(de, qe, "{a:?}");
        }
    }
}
