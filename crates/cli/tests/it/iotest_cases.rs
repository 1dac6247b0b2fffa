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

pub(super) fn img(dir: &std::path::Path, name: &str, fmt: &str, size: &str) -> String {
    let p = dir.join(name);
    qemu_img_ok(&["create", "-q", "-f", fmt, s(&p), size]);
    s(&p).to_string()
}

pub(super) fn v(items: &[&str]) -> Vec<String> {
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
    crate::qemu_overlay("qcow2", &base, "qcow2", s(&top));
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

/// Runs qemu-img (`qemu`) or diskimg with `a`.
pub(super) fn img_tool(qemu: bool, a: &[&str]) -> std::process::Output {
    if qemu { qemu_img(a) } else { diskimg(a) }
}

/// Runs `run` once with qemu's programs and once with diskimg, each in a fresh temporary
/// directory, asserts the two outputs are equal and returns qemu's.
pub(super) fn outputs_as_qemu(run: impl Fn(&std::path::Path, bool) -> Vec<String>) -> Vec<String> {
    let (qd, dd) = (tempdir(), tempdir());
    let q = run(qd.path(), true);
    let d = run(dd.path(), false);
    assert_eq!(d, q);
    q
}

/// Runs qemu-io argument lists with qemu-io (`qemu`) or `diskimg io`: each call's exit
/// code and output (timing lines dropped, `d` shown as DIR).
pub(super) fn io_calls(d: &std::path::Path, calls: &[Vec<String>], qemu: bool) -> Vec<String> {
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
}

/// qemu-io output with the timing line dropped.
pub(super) fn io_text(o: &std::process::Output) -> String {
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
        crate::qemu_overlay("qcow2", &base, "raw", s(&wrap));
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
        io_calls(d, &calls, qemu)
    };
    let q = outputs_as_qemu(run);
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

/// `amend --force` on LUKS key slots (iotest 293): overwriting an active slot and erasing
/// the last one are refused without it and done with it, as by qemu-img.
#[test]
fn amend_force_on_key_slots_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let t = s(&d.join("t.qcow2")).to_string();
        let sec = [
            "--object",
            "secret,id=sec0,data=pw0",
            "--object",
            "secret,id=sec1,data=pw1",
        ];
        let mk = [
            &["create"][..],
            &sec[..],
            &[
                "-q",
                "-f",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                &t,
                "1M",
            ],
        ]
        .concat();
        qemu_img_ok(&mk);
        let opts = |o: &str| format!("encrypt.{o}");
        let spec = format!("driver=qcow2,file.filename={t},encrypt.key-secret=sec0");
        let calls: Vec<Vec<String>> = vec![
            v(&[
                "amend",
                "--image-opts",
                &spec,
                "-o",
                &opts("state=active,encrypt.new-secret=sec1,encrypt.keyslot=0"),
            ]),
            v(&[
                "amend",
                "--image-opts",
                &spec,
                "-o",
                &opts("state=inactive,encrypt.keyslot=0"),
            ]),
            v(&[
                "amend",
                "--image-opts",
                &spec,
                "-o",
                &opts("state=inactive,encrypt.keyslot=3"),
                "--force",
            ]),
            v(&[
                "amend",
                "--image-opts",
                &spec,
                "-o",
                &opts(
                    "state=active,encrypt.new-secret=sec1,encrypt.iter-time=10,encrypt.keyslot=0",
                ),
                "--force",
            ]),
        ];
        calls
            .iter()
            .map(|c| {
                // The verb, the secrets, then its arguments (qemu-img's order).
                let mut a: Vec<&str> = vec![c[0].as_str()];
                a.extend(sec);
                a.extend(c.iter().skip(1).map(String::as_str));
                let o = img_tool(qemu, &a);
                let err = String::from_utf8_lossy(&o.stderr).replace("diskimg:", "qemu-img:");
                format!("{} {}", code(&o), err.replace(s(d), "DIR"))
            })
            .collect()
    };
    let (qd, dd) = (tempdir(), tempdir());
    let q = run(qd.path(), true);
    let d = run(dd.path(), false);
    assert_eq!(d, q);
    assert!(
        q[0].contains("Refusing to overwrite active keyslot 0"),
        "{q:?}"
    );
    assert!(q[3].starts_with("0 "), "{q:?}");
    // Only sec1 opens the image now, for both.
    for dir in [qd.path(), dd.path()] {
        let spec = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec1",
            s(&dir.join("t.qcow2"))
        );
        let o = crate::qemu_io_raw(&[
            "--object",
            "secret,id=sec1,data=pw1",
            "--image-opts",
            "-c",
            "read 0 4k",
            &spec,
        ]);
        assert!(o.status.success(), "{o:?}");
    }
}

/// commit into a backing file named by a `json:{…}` name with a blkdebug node that fails
/// the first guest-data write with ENOSPC (iotest 020): qemu's "Block job failed"; and
/// `-b` names taken relative to the overlay, not the working directory.
#[test]
fn commit_into_json_blkdebug_backing_and_relative_bases_as_qemu() {
    let failing = |d: &std::path::Path| {
        let base = img(d, "t.qcow2.base", "qcow2", "1M");
        let json = format!(
            "json:{{'driver': 'qcow2', 'file': {{ 'driver': 'blkdebug', 'inject-error': [{{ 'event': 'write_aio', 'errno': 28, 'once': true }}], 'image': {{ 'driver': 'file', 'filename': '{base}' }}}}}}"
        );
        let top = s(&d.join("t.qcow2")).to_string();
        crate::qemu_overlay("qcow2", &json, "qcow2", &top);
        let o = std::process::Command::new("qemu-io")
            .args(["-c", "write 0 64k", &top])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    };
    same_as_qemu(&failing, &|d| v(&["commit", s(&d.join("t.qcow2"))]));
    let chain = |d: &std::path::Path| {
        std::fs::create_dir(d.join("subdir")).unwrap();
        img(d, "subdir/t.qcow2.base", "qcow2", "1M");
        for (name, backing) in [("t.qcow2.mid", "t.qcow2.base"), ("t.qcow2", "t.qcow2.mid")] {
            let p = d.join("subdir").join(name);
            crate::qemu_overlay("qcow2", backing, "qcow2", s(&p));
        }
    };
    for base in ["t.qcow2.mid", "subdir/t.qcow2.mid"] {
        same_as_qemu(&chain, &|d| {
            v(&["commit", "-b", base, s(&d.join("subdir/t.qcow2"))])
        });
    }
}
