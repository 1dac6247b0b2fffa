//! Bad input: one line on stderr starting `diskimg: `, exit 1; check on raw exits 63.

use diskimg_testutil::{qemu_img, tempdir};

use crate::{code, diskimg, qemu_raw, s};

#[test]
fn bad_input_is_one_line_and_exit_1() {
    let dir = tempdir();
    let p = qemu_raw(dir.path(), "a.raw", "1M", &[]);
    let missing = dir.path().join("missing.raw");
    let new = dir.path().join("new.raw");
    let cases: Vec<Vec<&str>> = vec![
        vec!["info", s(&missing)],
        vec!["info", "-f", "nope", s(&p)],
        vec!["create", "-f", "raw", s(&new), "12x"],
        vec!["create", "-f", "raw", "-o", "bogus=1", s(&new), "1M"],
        vec!["create", "-f", "nope", s(&new), "1M"],
        vec!["create", "-f", "raw", s(&new)],
        vec!["map", "--output=xml", s(&p)],
        vec!["convert", "-O", "nope", s(&p), s(&new)],
        vec!["resize", "-f", "raw", s(&p), "-2M"],
        vec!["dd", "if=x"],
        vec!["info"],
        vec!["frobnicate"],
    ];
    for args in cases {
        let o = diskimg(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(code(&o), 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("diskimg: "), "{args:?}: {err}");
        // qemu-img refuses the same input.
        if args[0] != "frobnicate" {
            assert_ne!(qemu_img(&args).status.code(), Some(0), "{args:?}");
        }
    }
    assert!(!new.exists(), "a failed create left a file");
    let o = diskimg(&["info", s(&missing)]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "diskimg: Could not open '{0}': Could not open '{0}': No such file or directory\n",
            s(&missing)
        )
    );
}

#[test]
fn check_on_raw_has_no_check() {
    let dir = tempdir();
    let p = qemu_raw(dir.path(), "a.raw", "1M", &[]);
    for out in ["human", "json"] {
        let o = diskimg(&["check", "-f", "raw", &format!("--output={out}"), s(&p)]);
        let q = qemu_img(&["check", "-f", "raw", &format!("--output={out}"), s(&p)]);
        assert_eq!(code(&o), 63);
        assert_eq!(q.status.code(), Some(63));
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).replace("diskimg", "qemu-img"),
            String::from_utf8_lossy(&q.stderr)
        );
    }
}

#[test]
fn broken_pipe_is_success() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = tempdir();
    // Many map lines; close the reading end early.
    let cmds: Vec<String> = (0..200)
        .map(|i| format!("write -P 1 {}k 4k", i * 8))
        .collect();
    let cmd_refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let p = qemu_raw(dir.path(), "a.raw", "2M", &cmd_refs);
    let mut child = Command::new(env!("CARGO_BIN_EXE_diskimg"))
        .args(["map", "-f", "raw", "--output=json", s(&p)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    let _ = stdout.read(&mut first);
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.code() == Some(0),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn error_messages_match_qemu() {
    let dir = tempdir();
    let p = qemu_raw(dir.path(), "a.raw", "1M", &[]);
    let new = dir.path().join("new.raw");
    let cases: Vec<Vec<&str>> = vec![
        vec!["info", "-f", "nope", s(&p)],
        vec!["map", "-f", "nope", s(&p)],
        vec!["create", "-f", "raw", s(&new), "12x"],
        vec!["create", "-f", "raw", s(&new)],
        vec![
            "create",
            "-f",
            "raw",
            "-b",
            s(&p),
            "-F",
            "raw",
            s(&new),
            "1M",
        ],
        vec!["map", "--output=xml", s(&p)],
        vec!["check", "-r", "foo", s(&p)],
        vec!["convert", "-O", "nope", s(&p), s(&new)],
        vec!["convert", "-S", "1000", s(&p), s(&new)],
        vec!["convert", "-m", "0", s(&p), s(&new)],
        vec!["resize", "-f", "raw", s(&p), "-200M"],
        vec!["resize", "-f", "raw", s(&p), "-1k"],
        vec!["resize", "-f", "raw", s(&p), "+12x"],
        vec!["dd", "if=x"],
    ];
    for args in cases {
        let ours = String::from_utf8_lossy(&diskimg(&args).stderr).replace("diskimg:", "qemu-img:");
        let q = qemu_img(&args);
        let theirs = String::from_utf8_lossy(&q.stderr);
        // qemu sometimes adds a "Try 'qemu-img … --help'" line.
        let want: Vec<&str> = theirs.lines().filter(|l| !l.starts_with("Try ")).collect();
        assert_eq!(ours.trim_end(), want.join("\n"), "{args:?}");
    }
}
