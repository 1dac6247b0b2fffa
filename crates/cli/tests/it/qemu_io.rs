//! diskimg installed as `qemu-io` (a symlink, the drop-in way) against the real qemu-io:
//! the same command lines on copies of the same image must print the same text (stdout
//! and stderr interleaved through one pipe, timing figures masked), exit alike, and leave
//! images qemu-img compare calls identical.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use diskimg_testutil::{qemu_img_ok, tempdir};

use crate::s;

/// A directory holding `qemu-io` and `qemu-img` symlinks to the diskimg binary.
fn dropin(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["qemu-io", "qemu-img"] {
        let link = bin.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_diskimg"), &link).unwrap();
        }
    }
    bin
}

/// qemu-io's statistics line with its figures masked (qemu's `_filter_qemu_io`).
fn mask(text: &str) -> String {
    text.lines()
        .map(|l| match l.find(" ops; ") {
            Some(i) => {
                let head = l.get(..i).unwrap_or("");
                let unit = head.rsplit_once(", ").map_or(head, |(a, _)| a);
                format!("{unit}, X ops; STATS")
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `prog args` with `stdin`, stdout and stderr into one pipe; returns the masked
/// text (with the program path shown as PROG) and the exit code.
fn run(prog: &Path, args: &[String], stdin: &str, file: &Path) -> (String, i32) {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("\"$0\" \"$@\" 2>&1")
        .arg(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("run sh");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout)
        .replace(s(prog), "PROG")
        .replace(s(file), "FILE");
    (mask(&text), o.status.code().unwrap_or(-1))
}

/// Runs one script against copies of `image` with qemu-io and with diskimg as qemu-io;
/// asserts identical output, exit status and resulting image.
fn same(dir: &Path, image: &Path, fmt: &str, args: &[&str], stdin: &str) {
    same_lines(dir, image, fmt, args, stdin, &|_| true);
}

/// [`same`], comparing only the output lines `keep` selects.
fn same_lines(
    dir: &Path,
    image: &Path,
    fmt: &str,
    args: &[&str],
    stdin: &str,
    keep: &dyn Fn(&str) -> bool,
) {
    let bin = dropin(dir);
    let ours = dir.join(format!("ours.{fmt}"));
    let theirs = dir.join(format!("theirs.{fmt}"));
    std::fs::copy(image, &ours).unwrap();
    std::fs::copy(image, &theirs).unwrap();
    let argv = |f: &Path| -> Vec<String> {
        args.iter()
            .map(|a| a.replace("FILE", s(f)))
            .collect::<Vec<_>>()
    };
    let qemu = PathBuf::from(
        String::from_utf8(
            Command::new("sh")
                .args(["-c", "command -v qemu-io"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim(),
    );
    assert!(
        qemu.exists(),
        "qemu-io is not installed (apt-get install qemu-utils)"
    );
    let only = |t: String| t.lines().filter(|l| keep(l)).collect::<Vec<_>>().join("\n");
    let (want, wcode) = run(&qemu, &argv(&theirs), stdin, &theirs);
    let (got, gcode) = run(&bin.join("qemu-io"), &argv(&ours), stdin, &ours);
    let (want, got) = (only(want), only(got));
    assert_eq!(got, want, "output differs for {args:?} / {stdin:?}");
    assert_eq!(gcode, wcode, "exit status differs for {args:?}");
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", "-f", fmt, "-F", fmt, s(&ours), s(&theirs)])
        .status()
        .unwrap();
    assert!(cmp.success(), "images differ after {args:?}");
}

fn image(dir: &Path, fmt: &str, size: &str) -> PathBuf {
    let p = dir.join(format!("base.{fmt}"));
    qemu_img_ok(&["create", "-q", "-f", fmt, s(&p), size]);
    p
}

fn c(cmds: &[&str]) -> Vec<String> {
    cmds.iter()
        .flat_map(|c| ["-c".to_string(), (*c).to_string()])
        .collect()
}

/// Runs `-c` scripts for every format on a fresh image each.
fn scripts(fmts: &[&str], size: &str, cases: &[&[&str]]) {
    for fmt in fmts {
        for cmds in cases {
            let dir = tempdir();
            let img = image(dir.path(), fmt, size);
            let mut args: Vec<String> = vec!["-f".into(), (*fmt).into()];
            args.extend(c(cmds));
            args.push("FILE".into());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            same(dir.path(), &img, fmt, &args, "");
        }
    }
}

#[test]
fn getopt_flags_and_pattern_windows() {
    scripts(
        &["qcow2", "raw"],
        "16M",
        &[
            &[
                "write -pP 0xa 0 64k",
                "read -P0xa 0 64k",
                "read -P 0xa -s 512 -l 1k 0 4k",
                "read -P 0xb -s 512 -l 1k 0 4k",
                "read 0 64k -P 10 -q",
                "write -P 0x11 -- 4k 512",
                "read -v 4k 48",
            ],
            &[
                "read 0",
                "read -x 0 1",
                "write -P 300 0 1",
                "write -u 0 1",
                "write -z -P 1 0 1",
                "read -l 1 0 1",
                "read -P 1 -s 2k 0 1k",
                "read 0 4g",
                "read 1q 1",
                "read 0x 1",
                "bogus",
                "write 16M 512",
                "read -C -q 0 512",
            ],
        ],
    );
}

#[test]
fn vectored_async_and_zero_writes() {
    scripts(
        &["qcow2", "raw", "vmdk", "vpc", "vdi", "vhdx"],
        "16M",
        &[&[
            "writev -P 5 64k 4k 8k 512",
            "readv -P 5 64k 4k 8k 512",
            "aio_write -P 6 1M 64k",
            "aio_flush",
            "aio_read -P 6 1M 32k 32k",
            "aio_flush",
            "write -z 1M 4k",
            "read -P 0 1M 4k",
            "alloc 0 4M",
            "map",
            "length",
            "aio_read -i 0 1",
        ]],
    );
}

#[test]
fn zero_writes_with_unmap() {
    // (vmdk differs: diskimg leaves an unallocated grain without backing unallocated where
    // qemu writes zeroes into a new grain.)
    scripts(
        &["qcow2", "raw", "vpc", "vdi", "vhdx"],
        "16M",
        &[&[
            "write -P 1 0 1M",
            "write -z -u 64k 64k",
            "write -z -u 2M 64k",
            "write -z 512k 4k",
            "map",
            "alloc 0 3M",
        ]],
    );
}

#[test]
fn open_close_stdin_and_options() {
    let dir = tempdir();
    let img = image(dir.path(), "qcow2", "8M");
    // Commands from stdin, with the prompt, when no -c is given.
    same(
        dir.path(),
        &img,
        "qcow2",
        &["-f", "qcow2", "FILE"],
        "write -P 1 0 4k\nread -P 1 0 4k\nbogus\nread -P 2 0 4k\n\ninfo\nquit\nread 0 1\n",
    );
    // Starting without an image, open/close/reopen.
    same(
        dir.path(),
        &img,
        "qcow2",
        &[
            "-c",
            "read 0 512",
            "-c",
            "open -o driver=qcow2 FILE",
            "-c",
            "open FILE",
            "-c",
            "write -P 7 0 512",
            "-c",
            "reopen -r",
            "-c",
            "write 0 512",
            "-c",
            "reopen -w",
            "-c",
            "write -P 8 512 512",
            "-c",
            "close",
            "-c",
            "read 0 512",
            "-c",
            "open -r -o driver=qcow2 FILE",
            "-c",
            "read -P 7 0 512",
        ],
        "",
    );
    // Global options: repeated -f (last wins), cache and aio modes, -U, -r, -s.
    same(
        dir.path(),
        &img,
        "qcow2",
        &[
            "-f",
            "raw",
            "-f",
            "qcow2",
            "--cache",
            "writeback",
            "--aio",
            "threads",
            "-t",
            "none",
            "-i",
            "threads",
            "-U",
            "-c",
            "write 0 512",
            "-c",
            "read -P 0xcd 0 512",
            "FILE",
        ],
        "",
    );
    same(
        dir.path(),
        &img,
        "qcow2",
        &["-r", "-f", "qcow2", "-c", "write 0 512", "FILE"],
        "",
    );
    same(
        dir.path(),
        &img,
        "qcow2",
        &[
            "-s",
            "-f",
            "qcow2",
            "-c",
            "write -P 9 0 512",
            "-c",
            "read -P 9 0 512",
            "FILE",
        ],
        "",
    );
    same(
        dir.path(),
        &img,
        "qcow2",
        &["-t", "bogus", "-c", "read 0 512", "FILE"],
        "",
    );
    same(
        dir.path(),
        &img,
        "qcow2",
        &["-f", "qcow2", "-c", "open FILE", "FILE"],
        "",
    );
    same(
        dir.path(),
        &img,
        "qcow2",
        &["-f", "qcow2", "FILE", "FILE"],
        "",
    );
    same(
        dir.path(),
        &img,
        "qcow2",
        &["-f", "qcow2", "--bogus", "FILE"],
        "",
    );
    let json = format!(
        "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
        "FILE"
    );
    same(
        dir.path(),
        &img,
        "qcow2",
        &["-c", "write -P 3 0 4k", "-c", "read -P 3 0 4k", &json],
        "",
    );
}

#[test]
fn compressed_writes_over_several_clusters() {
    scripts(
        &["qcow2"],
        "4M",
        &[&[
            "write -c -P 0x41 0 192k",
            "read -P 0x41 0 192k",
            "write -c 100 512",
            "write -c 64k 64k",
            "map",
        ]],
    );
}

#[test]
fn argv0_names_the_program() {
    let dir = tempdir();
    let bin = dropin(dir.path());
    let o = Command::new(bin.join("qemu-img"))
        .args(["info", s(&dir.path().join("missing.img"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("qemu-img: Could not open"), "{err}");
    let o = crate::diskimg(&["info", s(&dir.path().join("missing.img"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("diskimg: Could not open"), "{err}");
}

/// `reopen` refuses to change the driver or node name of the image or its `file` and
/// `backing` children and accepts the unchanged values; a null-co image's `info` (iotest
/// 133).
#[test]
fn reopen_fixed_options_and_null_info() {
    for cmds in [
        &["reopen -o node-name=foo"][..],
        &["reopen -o file.node-name=foo"],
        &["reopen -o backing.node-name=foo"],
        &["reopen -o driver=raw"],
        &["reopen -o file.driver=qcow2"],
        &[
            "reopen -o driver=qcow2",
            "reopen -o file.driver=file",
            "read 0 512",
        ],
    ] {
        let dir = tempdir();
        let img = image(dir.path(), "qcow2", "1M");
        let mut args = c(cmds);
        args.push("FILE".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        same(dir.path(), &img, "qcow2", &args, "");
    }
    let dir = tempdir();
    let img = image(dir.path(), "raw", "1M");
    let null = "json:{'driver': 'null-co', 'size': 65536}";
    same(
        dir.path(),
        &img,
        "raw",
        &["-f", "null-co", "-c", "reopen", "-c", "info", null],
        "",
    );
}

/// `backing.driver=FMT` overrides the backing format the image names (iotest 114): with
/// a wrong `raw` in the header, the qcow2 backing file is read as qcow2.
#[test]
fn backing_driver_overrides_the_named_format() {
    let dir = tempdir();
    let base = image(dir.path(), "qcow2", "1M");
    let io = |args: &[&str]| {
        let o = Command::new("qemu-io").args(args).output().unwrap();
        assert!(o.status.success(), "{o:?}");
    };
    io(&["-f", "qcow2", "-c", "write -P 0x5a 0 64k", s(&base)]);
    let top = dir.path().join("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&top),
        "1M",
    ]);
    for open in ["open -o backing.driver=qcow2 FILE", "open FILE"] {
        let args = c(&[open, "read -P 0x5a 0 64k"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        same(dir.path(), &top, "qcow2", &args, "");
    }
}

/// blkdebug breakpoints (iotest 046): `break` suspends the request raising the event,
/// `wait_break` waits for it, `resume` lets it go on while later requests wait behind it;
/// qemu's `Suspended`/`Resuming` lines and the refusals for unknown events and tags.
#[test]
fn blkdebug_breakpoints_suspend_and_resume_requests() {
    let dir = tempdir();
    let base = image(dir.path(), "qcow2", "8M");
    let script = [
        "break write_aio A",
        "aio_write -P 10 0x18000 0x2000",
        "wait_break A",
        "resume A",
        "aio_flush",
        "break write_aio B",
        "aio_write -P 161 0x10c000 0x8000",
        "wait_break B",
        "aio_write -P 160 0x104000 0x18000",
        "sleep 10",
        "resume B",
        "aio_flush",
        "read -P 160 0x104000 0x8000",
        "resume B",
        "break no_such_event C",
        "remove_break X",
        "break write_aio D",
        "remove_break D",
        "write -P 3 0 4k",
        "help wait_break",
    ];
    // `-c` commands, no prompts: where qemu prints `Suspended` relative to its prompts
    // depends on whether the request had to wait for I/O before reaching the event.
    let mut args = c(&script);
    args.push("blkdebug::FILE".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    same(dir.path(), &base, "qcow2", &args, "");
}

/// Writes that are not whole blocks of a blkdebug node's `align` are read-modify-written
/// and serialised as qemu's block layer does (iotest 077): breakpoints on the RMW events
/// suspend them, overlapping requests wait behind them, and the data ends up as qemu's.
/// (Completion reports are left out: diskimg prints them when the session drains, qemu
/// as each request completes.)
#[test]
fn blkdebug_alignment_read_modify_writes() {
    let dir = tempdir();
    let base = image(dir.path(), "raw", "1M");
    let script = [
        "open -o driver=raw,file.align=4k blkdebug::FILE",
        "break pwritev_rmw_after_tail A",
        "aio_write -P 10 0x6000 0x200",
        "wait_break A",
        "break pwritev_rmw_after_head B",
        "aio_write -P 10 0x7e00 0x200",
        "wait_break B",
        "aio_write -P 11 0x6800 0x1000",
        "resume A",
        "sleep 20",
        "resume B",
        "aio_flush",
        "break pwritev A",
        "aio_write -P 10 0x10000 0x800",
        "wait_break A",
        "break pwritev_rmw_after_tail B",
        "aio_write -P 11 0x10000 0x400",
        "break pwritev_done C",
        "resume A",
        "wait_break C",
        "resume C",
        "wait_break B",
        "resume B",
        "aio_flush",
        "break pwritev_rmw_head A",
        "aio_write -P 12 0x20200 0x200",
        "wait_break A",
        "aio_write -P 13 0x20000 0x1000",
        "sleep 20",
        "resume A",
        "aio_flush",
        "read -P 11 0x6800 0x1000",
        "read -P 10 0x7e00 0x200",
        "read -P 11 0x10000 0x400",
        "read -P 10 0x10400 0x400",
        "read -P 13 0x20000 0x1000",
    ];
    let keep = |l: &str| !l.contains("wrote ") && !l.contains(" ops; ");
    let args = c(&script);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    same_lines(dir.path(), &base, "raw", &args, "", &keep);
}
