//! `diskimg serve` against real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy), with
//! qemu-nbd serving the same image as the oracle.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use diskimg_testutil::{qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::s;

/// A server process (diskimg serve or qemu-nbd) on a unix socket.
pub(crate) struct Served {
    child: Option<Child>,
    /// The socket path.
    pub(crate) sock: PathBuf,
}

/// Runs a command that must exist; a missing tool fails the test loudly.
pub(crate) fn tool(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} ({e}): install it (see .ci/run)"))
}

/// Runs a tool, asserting success; returns stdout.
pub(crate) fn tool_ok(cmd: &str, args: &[&str]) -> String {
    let o = tool(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl Served {
    /// `diskimg serve -k SOCK -t -e 0 ARGS…`.
    pub(crate) fn diskimg(dir: &Path, name: &str, args: &[&str]) -> Served {
        let sock = dir.join(format!("{name}.sock"));
        let k = sock.to_string_lossy().into_owned();
        let mut a = vec!["serve", "-k", &k, "-t", "-e", "0"];
        a.extend_from_slice(args);
        Self::spawn(env!("CARGO_BIN_EXE_diskimg"), &a, sock.clone())
    }

    /// `diskimg serve ARGS…` whose socket (NBD or vhost-user) is `sock`.
    pub(crate) fn diskimg_at(sock: &Path, args: &[&str]) -> Served {
        let mut a = vec!["serve"];
        a.extend_from_slice(args);
        Self::spawn(env!("CARGO_BIN_EXE_diskimg"), &a, sock.to_path_buf())
    }

    /// `qemu-nbd -k SOCK -t -e 0 -A ARGS…` (the oracle).
    pub(crate) fn qemu_nbd(dir: &Path, name: &str, args: &[&str]) -> Served {
        let sock = dir.join(format!("{name}.sock"));
        let k = sock.to_string_lossy().into_owned();
        let mut a = vec!["-k", &k, "-t", "-e", "0", "-A"];
        a.extend_from_slice(args);
        Self::spawn("qemu-nbd", &a, sock.clone())
    }

    fn spawn(cmd: &str, args: &[&str], sock: PathBuf) -> Served {
        let _ = std::fs::remove_file(&sock);
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd} ({e}): install it (see .ci/run)"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("{cmd} {args:?} exited early: {st}");
            }
            assert!(Instant::now() < deadline, "{cmd} did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        // qemu-nbd's socket file appears at bind(2), before listen(2): wait
        // until a connection is accepted (diskimg renames its socket into
        // place once listening; a vhost-user socket takes one client only).
        if cmd == "qemu-nbd" {
            while std::os::unix::net::UnixStream::connect(&sock).is_err() {
                assert!(Instant::now() < deadline, "{cmd} did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Served {
            child: Some(child),
            sock,
        }
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The NBD URI of the export (default name).
    pub(crate) fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// Sends `sig` and waits (bounded) for the exit.
    pub(crate) fn signal(mut self, sig: &str) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        tool_ok("kill", &[&format!("-{sig}"), &child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server ignored SIG{sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM; asserts a clean exit.
    pub(crate) fn stop(self) {
        let st = self.signal("TERM");
        assert!(st.success(), "server exit status {st}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `qemu-img map --output=json` reduced to what an NBD client can see (start, length,
/// data, zero), adjacent equal runs merged.
pub(crate) fn visible_map(target: &str, extra: &[&str]) -> Vec<(u64, u64, bool, bool)> {
    let mut args = vec!["map", "--output=json"];
    args.extend_from_slice(extra);
    args.push(target);
    let v: serde_json::Value = serde_json::from_str(&qemu_img_ok(&args)).unwrap();
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (st, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (data, zero) = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        match out.last_mut() {
            Some(l) if l.2 == data && l.3 == zero && l.0 + l.1 == st => l.1 += len,
            _ => out.push((st, len, data, zero)),
        }
    }
    out
}

/// `nbdinfo --map[=CONTEXT]` lines, adjacent equal types merged.
pub(crate) fn nbd_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, String)> {
    let flag = context.map_or("--map".to_string(), |c| format!("--map={c}"));
    let text = tool_ok("nbdinfo", &[&flag, uri]);
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (st, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        let ty = f[2..].join(" ");
        match out.last_mut() {
            Some(l) if l.2 == ty && l.0 + l.1 == st => l.1 += len,
            _ => out.push((st, len, ty)),
        }
    }
    out
}

/// An image of `fmt` with data, zeroes and holes; qcow2 gets a raw backing file.
pub(crate) fn sample(dir: &Path, fmt: &str) -> PathBuf {
    sample_as(dir, fmt, "img")
}

/// [`sample`] named `STEM.FMT`.
pub(crate) fn sample_as(dir: &Path, fmt: &str, stem: &str) -> PathBuf {
    sample_over(dir, fmt, (fmt == "qcow2").then_some("raw"), stem)
}

/// [`sample_as`] over a backing file of format `backing` (`STEM-base.BACKING`) with data
/// of its own, or alone.
pub(crate) fn sample_over(dir: &Path, fmt: &str, backing: Option<&str>, stem: &str) -> PathBuf {
    let p = dir.join(format!("{stem}.{fmt}"));
    if let Some(bfmt) = backing {
        let name = format!("{stem}-base.{bfmt}");
        let base = dir.join(&name);
        qemu_img_ok(&["create", "-q", "-f", bfmt, s(&base), "16M"]);
        qemu_io(&base, bfmt, &["write -P 0x61 0 3M", "write -P 0x62 9M 64k"]);
        crate::qemu_overlay(fmt, &name, bfmt, s(&p));
    } else {
        qemu_img_ok(&["create", "-q", "-f", fmt, s(&p), "16M"]);
    }
    qemu_io(
        &p,
        fmt,
        &[
            "write -P 0x71 1M 1M",
            "write -P 0x72 6M 4k",
            "write -z 2M 512k",
            "write -P 0x73 15M 1M",
        ],
    );
    p
}

#[test]
fn clients_read_every_format_like_qemu_nbd() {
    let dir = tempdir();
    for fmt in ["qcow2", "raw", "vmdk", "vhdx", "vdi", "vpc"] {
        let img = sample(dir.path(), fmt);
        let ours = Served::diskimg(dir.path(), &format!("d-{fmt}"), &["-r", "-f", fmt, s(&img)]);
        let theirs = Served::qemu_nbd(dir.path(), &format!("q-{fmt}"), &["-r", "-f", fmt, s(&img)]);
        let (u, q) = (ours.uri(), theirs.uri());
        // compare / convert / map through the export equal the verbs on the file.
        let o = qemu_img(&["compare", "-f", fmt, s(&img), &u]);
        assert!(
            o.status.success(),
            "{fmt}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let out = dir.path().join(format!("out-{fmt}.raw"));
        qemu_img_ok(&["convert", "-O", "raw", &u, s(&out)]);
        qemu_img_ok(&["compare", "-f", "raw", "-F", fmt, s(&out), s(&img)]);
        assert_eq!(
            visible_map(&u, &[]),
            visible_map(s(&img), &["-f", fmt]),
            "{fmt}"
        );
        // nbdinfo sees what qemu-nbd shows, in both metadata contexts.
        assert_eq!(
            nbd_map(&u, None),
            nbd_map(&q, None),
            "{fmt} base:allocation"
        );
        let depth = Some("qemu:allocation-depth");
        assert_eq!(
            nbd_map(&u, depth),
            nbd_map(&q, depth),
            "{fmt} allocation depth"
        );
        // nbdcopy (several connections: multi-conn) copies the same bytes.
        let copy = dir.path().join(format!("copy-{fmt}.raw"));
        tool_ok("nbdcopy", &[&u, s(&copy)]);
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            std::fs::read(&out).unwrap(),
            "{fmt}"
        );
        ours.stop();
        theirs.stop();
    }
}

#[test]
fn encrypted_image_with_secret_and_image_opts() {
    let dir = tempdir();
    let img = dir.path().join("enc.qcow2");
    let obj = "secret,id=s0,data=hunter2";
    qemu_img_ok(&[
        "create",
        "-q",
        "--object",
        obj,
        "-f",
        "qcow2",
        "-o",
        // A short PBKDF time: qemu calibrates the iterations for its own 2 s by default,
        // which a debug build under load takes far longer to derive than the listen bound.
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50",
        s(&img),
        "4M",
    ]);
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        s(&img)
    );
    let o = crate::qemu_io_raw(&[
        "--object",
        obj,
        "--image-opts",
        "-c",
        "write -P 0x5e 64k 128k",
        &opts,
    ]);
    assert!(o.status.success());
    let srv = Served::diskimg(dir.path(), "enc", &["--object", obj, "--image-opts", &opts]);
    let out = tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5e 64k 128k",
            "-c",
            "read -P 0 0 64k",
            &srv.uri(),
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    srv.stop();
}

#[test]
fn fork_pid_file_and_read_only() {
    let dir = tempdir();
    let img = sample(dir.path(), "qcow2");
    let sock = dir.path().join("f.sock");
    let pidf = dir.path().join("pid");
    let t = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_diskimg"))
        .args([
            "serve",
            "--fork",
            "-t",
            "-r",
            "--pid-file",
            s(&pidf),
            "-k",
            s(&sock),
            s(&img),
        ])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(t.elapsed() < Duration::from_secs(20));
    let pid = std::fs::read_to_string(&pidf).unwrap().trim().to_string();
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let info = tool_ok("nbdinfo", &[&uri]);
    assert!(info.contains("is_read_only: true"), "{info}");
    let w = tool("qemu-io", &["-f", "raw", "-c", "write 0 4k", &uri]);
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        !w.status.success() && text.contains("Permission denied"),
        "{text}"
    );
    tool_ok("kill", &["-TERM", &pid]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pidf.exists() || sock.exists() {
        assert!(Instant::now() < deadline, "forked server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = crate::diskimg(&["serve", "-k", s(&sock), "--cache", "bogus", s(&img)]);
    assert_eq!(crate::code(&o), 1);
    let o = crate::diskimg(&["serve", "-k", s(&sock), s(&dir.path().join("missing"))]);
    assert_eq!(crate::code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Could not open"));
    // More vhost-user-blk workers than allowed: refused before anything listens.
    let vsock = dir.path().join("v.sock");
    let o = crate::diskimg(&[
        "serve",
        "--vhost-user-blk",
        s(&vsock),
        "--queue-workers",
        "257",
        s(&img),
    ]);
    assert_eq!(crate::code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--queue-workers must be at most 256"));
    assert!(!vsock.exists());
    // A poll longer than 1 ms: refused the same way.
    let o = crate::diskimg(&[
        "serve",
        "--vhost-user-blk",
        s(&vsock),
        "--poll-us",
        "1001",
        s(&img),
    ]);
    assert_eq!(crate::code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--poll-us must be at most 1000"));
    assert!(!vsock.exists());
}
