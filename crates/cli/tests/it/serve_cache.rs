//! `diskimg serve --cache` opens the image's files as qemu-nbd opens them, `json:` and
//! `--image-opts` arguments included (their own `cache.direct` wins over `--cache`), and
//! the vhost-user-blk defaults follow what was opened: 16 workers per queue (and
//! per-request notifications, no split at depth 1) when the files bypass the page
//! cache, 4 otherwise. Before session 11 a `json:`/`--image-opts` image was opened
//! through the page cache whatever `--cache` said, with the `O_DIRECT` defaults.

use std::path::Path;
use std::time::{Duration, Instant};

use diskimg_testutil::{qemu_img_ok, tempdir};

use crate::s;
use crate::serve::Served;

/// `O_DIRECT` in the `flags:` line of `/proc/PID/fdinfo/FD` (octal, x86-64).
const O_DIRECT: u32 = 0o40000;

/// Whether process `pid` has `file` open with `O_DIRECT` (`None`: not open at all).
pub(crate) fn direct_of(pid: u32, file: &Path) -> Option<bool> {
    let file = file.canonicalize().unwrap();
    let mut found = None;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = fd.unwrap();
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(file.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        let d = flags & O_DIRECT != 0;
        assert!(found.is_none_or(|f| f == d), "{file:?} open both ways");
        found = Some(d);
    }
    found
}

/// Threads of process `pid` that execute vhost-user-blk requests (`vublk-qQ-N`).
fn workers(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("vublk-q"))
        .count()
}

/// The workers a vhost-user-blk server at `sock` (process `pid`) starts for a
/// frontend: it starts them as one connects, before any message.
fn workers_started(pid: u32, sock: &Path) -> usize {
    let _frontend = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers(pid) < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let every worker it means to start appear.
    std::thread::sleep(Duration::from_millis(300));
    workers(pid)
}

#[test]
fn vhost_defaults_follow_the_cache_the_image_is_opened_with() {
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&base), "64M"]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        s(&base),
        s(&top),
    ]);
    let opts = format!("driver=qcow2,file.filename={}", top.display());
    let json = |cache: &str| {
        format!(
            r#"json:{{"driver":"qcow2",{cache}"file":{{"driver":"file","filename":"{}"}}}}"#,
            top.display()
        )
    };
    let cases: Vec<Vec<String>> = vec![
        vec!["-f".into(), "qcow2".into(), s(&top).into()],
        vec![
            "--cache=none".into(),
            "-f".into(),
            "qcow2".into(),
            s(&top).into(),
        ],
        vec!["--cache=none".into(), "--image-opts".into(), opts.clone()],
        vec!["--image-opts".into(), format!("{opts},cache.direct=on")],
        vec![
            "--cache=directsync".into(),
            "--image-opts".into(),
            format!("{opts},cache.direct=off"),
        ],
        vec!["--cache=none".into(), json("")],
        vec!["--cache=none".into(), json(r#""cache":{"direct":false},"#)],
        vec![json(r#""cache":{"direct":true},"#)],
    ];
    let sock = dir.path().join("vblk.sock");
    for case in &cases {
        let args: Vec<&str> = case.iter().map(String::as_str).collect();
        // qemu-nbd's files are the oracle.
        // qemu-nbd listens before it opens the image: wait for both files.
        let q = Served::qemu_nbd(dir.path(), "q", &args);
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = loop {
            let w = (direct_of(q.pid(), &top), direct_of(q.pid(), &base));
            if (w.0.is_some() && w.1.is_some()) || Instant::now() > deadline {
                break w;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        drop(q); // killed: its exit is not what is tested
        assert!(
            want.0.is_some() && want.1.is_some(),
            "{args:?}: qemu-nbd {want:?}"
        );
        let mut a = vec!["--vhost-user-blk", s(&sock)];
        a.extend_from_slice(&args);
        let v = Served::diskimg_at(&sock, &a);
        let got = (direct_of(v.pid(), &top), direct_of(v.pid(), &base));
        assert_eq!(
            got, want,
            "{args:?}: O_DIRECT of the image and its backing file"
        );
        let n = workers_started(v.pid(), &sock);
        let direct = want.0 == Some(true);
        assert_eq!(n, if direct { 16 } else { 4 }, "{args:?}: workers");
        v.stop();
    }
}
