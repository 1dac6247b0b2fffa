//! Scenarios from qemu-iotests that failed with diskimg, each judged by qemu-img itself:
//! the same exit status and the same stderr (diskimg's prefix aside) on the same files.

use diskimg_testutil::{qemu_img, qemu_img_ok, tempdir};

use crate::{code, diskimg, s};

/// Runs `args` with both programs on fresh copies of the same setup and compares.
fn same_as_qemu(setup: &dyn Fn(&std::path::Path), args: &dyn Fn(&std::path::Path) -> Vec<String>) {
    let (qd, dd) = (tempdir(), tempdir());
    setup(qd.path());
    setup(dd.path());
    let qa = args(qd.path());
    let da = args(dd.path());
    let q = qemu_img(&qa.iter().map(String::as_str).collect::<Vec<_>>());
    let d = diskimg(&da.iter().map(String::as_str).collect::<Vec<_>>());
    let qerr = String::from_utf8_lossy(&q.stderr).replace(s(qd.path()), "DIR");
    let derr = String::from_utf8_lossy(&d.stderr)
        .replace(s(dd.path()), "DIR")
        .replacen("diskimg: ", "qemu-img: ", 1);
    assert_eq!(code(&d), q.status.code().unwrap_or(-1), "{da:?}: {derr}");
    assert_eq!(derr, qerr, "{da:?}");
}

fn img(dir: &std::path::Path, name: &str, fmt: &str, size: &str) -> String {
    let p = dir.join(name);
    qemu_img_ok(&["create", "-q", "-f", fmt, s(&p), size]);
    s(&p).to_string()
}

fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|x| x.to_string()).collect()
}

/// qemu-img convert's refusals, in qemu's order (iotests 114, 122).
#[test]
fn convert_refusals_as_qemu() {
    let two = |d: &std::path::Path| {
        img(d, "a.raw", "raw", "1M");
        img(d, "b.raw", "raw", "1M");
        img(d, "base.qcow2", "qcow2", "2M");
    };
    let p = |d: &std::path::Path, n: &str| s(&d.join(n)).to_string();
    same_as_qemu(&two, &|d| {
        let (a, b, base, t) = (
            p(d, "a.raw"),
            p(d, "b.raw"),
            p(d, "base.qcow2"),
            p(d, "t.qcow2"),
        );
        v(&["convert", "-O", "qcow2", "-B", &base, &a, &b, &t])
    });
    same_as_qemu(&two, &|d| {
        let (a, base, t) = (p(d, "a.raw"), p(d, "base.qcow2"), p(d, "t.qcow2"));
        v(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            &format!("backing_file={base}"),
            &a,
            &t,
        ])
    });
    same_as_qemu(&two, &|d| {
        let (a, b) = (p(d, "a.raw"), p(d, "b.raw"));
        v(&[
            "convert",
            "-n",
            "-O",
            "raw",
            "-o",
            "preallocation=off",
            &a,
            &b,
        ])
    });
}

/// `-o backing_file=` works as -B: clusters the backing file has are left out
/// (iotest 019's second conversion).
#[test]
fn convert_o_backing_file_is_b() {
    let dir = tempdir();
    let d = dir.path();
    let base = img(d, "base.qcow2", "qcow2", "4M");
    diskimg_testutil::qemu_io(
        std::path::Path::new(&base),
        "qcow2",
        &["write -P 42 1M 64k"],
    );
    let top = d.join("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &base,
        "-F",
        "qcow2",
        s(&top),
    ]);
    diskimg_testutil::qemu_io(&top, "qcow2", &["write -P 43 2M 64k"]);
    for (name, opt) in [("q.qcow2", true), ("d.qcow2", false)] {
        let out = d.join(name);
        let args = [
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "-o",
            &format!("backing_file={base},backing_fmt=qcow2"),
            s(&top),
            s(&out),
        ];
        if opt {
            qemu_img_ok(&args);
        } else {
            let o = diskimg(&args);
            assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let map = |n: &str| {
        let o = qemu_img_ok(&["map", "--output=json", "-f", "qcow2", s(&d.join(n))]);
        o.replace(s(d), "DIR")
            .replace("q.qcow2", "X")
            .replace("d.qcow2", "X")
    };
    let m = map("d.qcow2");
    assert_eq!(m, map("q.qcow2"));
    // The backing file's cluster at 1M is not copied into the top.
    assert!(
        m.contains("\"start\": 1048576, \"length\": 65536, \"depth\": 1"),
        "{m}"
    );
    assert_eq!(
        code(&diskimg(&["compare", s(&top), s(&d.join("d.qcow2"))])),
        0
    );
}

/// Create-time limits and rebase -c on a format without compression (iotests 054,
/// 112, 314).
#[test]
fn create_and_rebase_refusals_as_qemu() {
    let p = |d: &std::path::Path, n: &str| s(&d.join(n)).to_string();
    let none = |_: &std::path::Path| {};
    same_as_qemu(&none, &|d| {
        v(&["create", "-q", "-f", "qcow2", &p(d, "t.qcow2"), "1024P"])
    });
    same_as_qemu(&none, &|d| {
        v(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=-1",
            &p(d, "t.qcow2"),
            "1M",
        ])
    });
    same_as_qemu(
        &|d| {
            img(d, "t.raw", "raw", "1M");
        },
        &|d| v(&["rebase", "-c", "-f", "raw", "-b", "", &p(d, "t.raw")]),
    );
}

/// A backing format qemu has no driver for (iotest 114).
#[test]
fn unknown_backing_format_as_qemu() {
    let setup = |d: &std::path::Path| {
        img(d, "base.raw", "raw", "1M");
        let t = d.join("t.qcow2");
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&t),
            "1M",
        ]);
        let mut b = std::fs::read(&t).unwrap();
        let at = b.windows(3).skip(104).position(|w| w == b"raw").unwrap() + 104;
        b[at..at + 3].copy_from_slice(b"foo");
        std::fs::write(&t, b).unwrap();
    };
    same_as_qemu(&setup, &|d| {
        v(&["map", "-f", "qcow2", s(&d.join("t.qcow2"))])
    });
}

/// qemu-io output with the timing line dropped.
fn io_text(o: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    text.lines()
        .filter(|l| !l.contains(" ops;"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Copy-on-read through a blkdebug node that fails writes over sector 2048 once a
/// copy-on-read write happened (iotests 197/215): the allocated cluster is not copied
/// again, so the read succeeds; a read whose copy covers that sector fails with EIO;
/// a partial final cluster without backing file is allocated; with subclusters only the
/// read's subclusters are copied.
#[test]
fn copy_on_read_with_blkdebug_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let base = img(d, "base.raw", "raw", "4M");
        let wrap = d.join("w.qcow2");
        let conf = d.join("c.conf");
        std::fs::write(
            &conf,
            "[inject-error]\nevent = \"cor_write\"\nsector = \"2048\"\n",
        )
        .unwrap();
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &base,
            "-F",
            "raw",
            s(&wrap),
        ]);
        let tiny = d.join("tiny.qcow2");
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=1.1",
            s(&tiny),
            "1024",
        ]);
        let sub = d.join("sub.qcow2");
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            &base,
            "-F",
            "raw",
            s(&sub),
            "4M",
        ]);
        let open = format!(
            "open -C -o driver=blkdebug,config={},image.driver=qcow2 {}",
            s(&conf),
            s(&wrap)
        );
        let calls: Vec<Vec<String>> = vec![
            v(&["-f", "qcow2", "-c", "write -z -u 1M 64k", s(&wrap)]),
            v(&["-c", &open, "-c", "read -P 0 1M 128k"]),
            v(&["-c", &open, "-c", "read -P 0 960k 128k"]),
            v(&["-f", "qcow2", "-c", "map", s(&wrap)]),
            v(&["-f", "qcow2", "-C", "-c", "read 0 1024", s(&tiny)]),
            v(&["-f", "qcow2", "-c", "map", s(&tiny)]),
            v(&["-f", "qcow2", "-c", "write -P 0xbb 28K 2K", s(&sub)]),
            v(&["-f", "qcow2", "-C", "-c", "read 30K 4K", s(&sub)]),
            v(&["-f", "qcow2", "-c", "map", s(&sub)]),
        ];
        calls
            .iter()
            .map(|a| {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                let o = if qemu {
                    crate::qemu_io_raw(&a)
                } else {
                    diskimg(&[&["io"], a.as_slice()].concat())
                };
                format!("{:?} {}", o.status.code(), io_text(&o).replace(s(d), "DIR"))
            })
            .collect()
    };
    let (qd, dd) = (tempdir(), tempdir());
    let q = run(qd.path(), true);
    let d = run(dd.path(), false);
    assert_eq!(d, q);
    assert!(q[2].contains("Input/output error"), "{q:?}");
}

/// Zero writes through a blkdebug node with request limits (iotest 204): pieces smaller
/// than its zero alignment fall back to writes of zeroes (data), aligned pieces become
/// zero clusters; `qemu-img map --image-opts` over the blkdebug node names the qcow2
/// file. The image written by diskimg maps as the one written by qemu-io.
#[test]
fn blkdebug_limits_split_zero_writes_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let t = d.join("t.qcow2");
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=1M",
            s(&t),
            "128M",
        ]);
        let base = "driver=blkdebug,image.driver=qcow2";
        let calls: Vec<Vec<String>> = vec![
            v(&["-f", "qcow2", "-c", "write -P 22 0 110M", s(&t)]),
            v(&[
                "-c",
                &format!(
                    "open -o {base},align=512,max-transfer=64k,opt-write-zero=1M blkdebug::{}",
                    s(&t)
                ),
                "-c",
                "write -z 8003584 2093056",
            ]),
            v(&[
                "-c",
                &format!(
                    "open -o {base},align=512,opt-write-zero=15M,max-write-zero=15M blkdebug::{}",
                    s(&t)
                ),
                "-c",
                "write -z 32M 32M",
            ]),
        ];
        let mut out: Vec<String> = calls
            .iter()
            .map(|a| {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                let o = if qemu {
                    crate::qemu_io_raw(&a)
                } else {
                    diskimg(&[&["io"], a.as_slice()].concat())
                };
                format!("{:?} {}", o.status.code(), io_text(&o).replace(s(d), "DIR"))
            })
            .collect();
        // Judged by qemu-img either way.
        let map = qemu_img_ok(&["map", "-f", "qcow2", s(&t)]);
        out.push(map.replace(s(d), "DIR"));
        let opts = format!(
            "{base},image.file.driver=file,image.file.filename={},align=4k",
            s(&t)
        );
        let m = if qemu {
            qemu_img(&["map", "--image-opts", &opts])
        } else {
            diskimg(&["map", "--image-opts", &opts])
        };
        out.push(String::from_utf8_lossy(&m.stdout).replace(s(d), "DIR"));
        out
    };
    let (qd, dd) = (tempdir(), tempdir());
    let q = run(qd.path(), true);
    let d = run(dd.path(), false);
    assert_eq!(d, q);
    // 45M..60M became zero clusters, the pieces around it data.
    assert!(q[3].contains("0x900000        0x2400000"), "{q:?}");
}

/// The raw format's `offset`/`size` options (iotest 171): the guest sees a window of the
/// file; requests past it fail with EIO instead of reaching the rest of the file.
#[test]
fn raw_offset_and_size_window_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let t = img(d, "t.raw", "raw", "1M");
        let json = format!(
            r#"json:{{"driver":"raw", "offset":"512", "size":"4096", "file": {{"driver":"file", "filename":"{t}"}}}}"#
        );
        let calls: Vec<Vec<String>> = vec![
            v(&["-c", "write -P 0x0a 0 4096", &json]),
            v(&["-c", "read -P 0x0a 0 4096", &json]),
            v(&["-c", "write 4095 2", &json]),
            v(&["-c", "read 4096 1", &json]),
            v(&["-c", "writev 3072 1024 1024", &json]),
            v(&["-f", "raw", "-c", "read -v 510 4", &t]),
            v(&["-f", "raw", "-c", "read -v 4606 4", &t]),
        ];
        calls
            .iter()
            .map(|a| {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                let o = if qemu {
                    crate::qemu_io_raw(&a)
                } else {
                    diskimg(&[&["io"], a.as_slice()].concat())
                };
                format!("{:?} {}", o.status.code(), io_text(&o).replace(s(d), "DIR"))
            })
            .collect()
    };
    let (qd, dd) = (tempdir(), tempdir());
    let q = run(qd.path(), true);
    let d = run(dd.path(), false);
    assert_eq!(d, q);
    assert!(q[2].contains("Input/output error"), "{q:?}");
}

/// `rebase -u -F host_device` writes qemu's other driver names as the backing format
/// (iotest 031); an unknown name is still refused.
#[test]
fn rebase_unsafe_keeps_other_qemu_backing_drivers() {
    let (qd, dd) = (tempdir(), tempdir());
    let q = img(qd.path(), "t.qcow2", "qcow2", "1M");
    let d = img(dd.path(), "t.qcow2", "qcow2", "1M");
    let args = |f: &str| {
        v(&[
            "rebase",
            "-u",
            "-b",
            "/some/backing/file/path",
            "-F",
            "host_device",
            f,
        ])
    };
    qemu_img_ok(&args(&q).iter().map(String::as_str).collect::<Vec<_>>());
    crate::diskimg_ok(&args(&d).iter().map(String::as_str).collect::<Vec<_>>());
    let info = |f: &str| qemu_img_ok(&["info", "-U", "--output=json", f]);
    let di = info(&d);
    assert_eq!(di.replace(&d, "F"), info(&q).replace(&q, "F"));
    assert!(
        di.contains("\"backing-filename-format\": \"host_device\""),
        "{di}"
    );
    let bad = diskimg(&["rebase", "-u", "-b", "x", "-F", "nosuch", &d]);
    assert_eq!(code(&bad), 1);
}

/// qemu's `compress` filter and hexadecimal sizes (iotest 214): unaligned writes through
/// it are padded to whole clusters and stored compressed; a cluster already allocated
/// cannot be written compressed (EIO).
#[test]
fn compress_filter_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let t = d.join("t.qcow2");
        let c = if qemu {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=0x10000",
                s(&t),
                "2M",
            ])
        } else {
            diskimg(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=0x10000",
                s(&t),
                "2M",
            ])
        };
        assert_eq!(code(&c), 0, "{c:?}");
        let spec = format!(
            "json:{{'driver': 'compress', 'file': {{'driver': 'qcow2', 'file': {{'driver': 'file', 'filename': '{}'}}}}}}",
            s(&t)
        );
        let calls = [
            v(&["-c", "write -P 0xbb 0 229376", &spec]),
            v(&["-c", "write -P 0xcc 278528 229376", &spec]),
            v(&["-c", "write -P 0xdd 0 512", &spec]),
            v(&[
                "-f",
                "qcow2",
                "-c",
                "read -P 0xbb 0 229376",
                "-c",
                "read -P 0xcc 278528 229376",
                s(&t),
            ]),
        ];
        let mut out: Vec<String> = calls
            .iter()
            .map(|a| {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                let o = if qemu {
                    crate::qemu_io_raw(&a)
                } else {
                    diskimg(&[&["io"], a.as_slice()].concat())
                };
                format!("{:?} {}", o.status.code(), io_text(&o).replace(s(d), "DIR"))
            })
            .collect();
        let check = qemu_img(&["check", "--output=json", s(&t)]);
        let text = String::from_utf8_lossy(&check.stdout).to_string();
        out.extend(
            text.lines()
                .filter(|l| l.contains("compressed-clusters"))
                .map(str::to_string),
        );
        out
    };
    let (qd, dd) = (tempdir(), tempdir());
    let q = run(qd.path(), true);
    let d = run(dd.path(), false);
    assert_eq!(d, q);
    assert!(
        q.iter().any(|l| l.contains("\"compressed-clusters\": 8")),
        "{q:?}"
    );
    assert!(q[2].contains("Input/output error"), "{q:?}");
}

/// `bitmap --granularity` is `-g`'s long form (iotest 190).
#[test]
fn bitmap_granularity_long_option() {
    let d = tempdir();
    let t = img(d.path(), "t.qcow2", "qcow2", "16M");
    crate::diskimg_ok(&[
        "bitmap",
        "--add",
        "--granularity",
        "512",
        "-f",
        "qcow2",
        &t,
        "b1",
    ]);
    let info = qemu_img_ok(&["info", "--output=json", &t]);
    assert!(info.contains("\"granularity\": 512"), "{info}");
}

/// `convert --salvage` over a blkdebug node whose rules fail block-status queries and
/// reads at given sectors from the start (`event: none`; iotest 251): the same warnings
/// as qemu-img, in the same order, and the same image (failed sectors as zeroes).
#[test]
fn convert_salvage_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> (String, i32) {
        let orig = img(d, "orig.qcow2", "qcow2", "4M");
        let w = crate::qemu_io_raw(&["-f", "qcow2", "-c", "write -P 42 0 4M", &orig]);
        assert!(w.status.success());
        let rule = |iotype: &str, ofs: u64| {
            format!(
                "{{'event': 'none', 'iotype': '{iotype}', 'errno': 5, 'sector': {}}}",
                ofs / 512
            )
        };
        let rules = [
            rule("block-status", (1 << 20) + 8192),
            rule("block-status", (2 << 20) + 512),
            rule("read", (2 << 20) - 65536),
            rule("read", (2 << 20) + 512),
            rule("read", 3 << 20),
            rule("read", (3 << 20) + 1024),
        ]
        .join(",");
        let src = format!(
            "json:{{'driver': 'blkdebug', 'image': {{'driver': 'qcow2', 'file': {{'driver': 'file', 'filename': '{orig}'}}}}, 'inject-error': [{rules}]}}"
        );
        let out = s(&d.join("out.qcow2")).to_string();
        let args = ["convert", "--salvage", "-O", "qcow2", &src, &out];
        let o = if qemu {
            qemu_img(&args)
        } else {
            diskimg(&args)
        };
        let text = String::from_utf8_lossy(&o.stderr).to_string();
        (text, code(&o))
    };
    let (qd, dd) = (tempdir(), tempdir());
    let q = run(qd.path(), true);
    let d = run(dd.path(), false);
    assert_eq!(d.1, q.1);
    assert_eq!(d.0.replace("diskimg:", "qemu-img:"), q.0);
    assert!(
        q.0.contains("error while reading block status at offset 1056768"),
        "{q:?}"
    );
    let cmp = qemu_img(&[
        "compare",
        s(&qd.path().join("out.qcow2")),
        s(&dd.path().join("out.qcow2")),
    ]);
    assert!(cmp.status.success(), "{cmp:?}");
}
