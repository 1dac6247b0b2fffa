//! Image locking against qemu (issue 15.4, issue 17): a writer excludes other writers and
//! qemu, qemu excludes us, with qemu's messages; `-U` reads next to a writer; locks go
//! with the close. The holders are a `qemu-io` kept open by its `sleep` command and this
//! test process itself opening the image through the library.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diskimg::{Format, ImageOptions};
use diskimg_testutil::{qemu_img, qemu_img_ok, tempdir};

use crate::{code, diskimg, diskimg_ok, qemu_io_raw, s};

/// A `qemu-io` (or `diskimg io`) holding `path` (read-write unless `ro`) until killed,
/// once its locks are in place.
pub(crate) struct QemuHolder(Child);

impl QemuHolder {
    pub(crate) fn start(path: &Path, fmt: &str, extra: &[&str]) -> Self {
        Self::start_with("qemu-io", path, fmt, extra)
    }

    /// `program` (`qemu-io` or our binary's `io`) with `extra` commands before its sleep.
    pub(crate) fn start_with(program: &str, path: &Path, fmt: &str, extra: &[&str]) -> Self {
        let mut cmd = Command::new(program);
        if program != "qemu-io" {
            cmd.arg("io");
        }
        let mut args = vec!["-f", fmt];
        args.extend(extra);
        args.extend(["-c", "sleep 60000", s(path)]);
        let child = cmd
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run qemu-io (install qemu-utils)");
        let h = Self(child);
        // Its lock bytes appear in /proc/locks once the image is open (bounded wait).
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
            if locks.lines().any(|l| l.contains(&format!(":{ino} "))) {
                return h;
            }
            assert!(Instant::now() < deadline, "{program} never locked {path:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for QemuHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qcow2(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    p
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn qemu_holding_an_image_excludes_our_writes() {
    let dir = tempdir();
    let p = qcow2(dir.path(), "held.qcow2");
    let holder = QemuHolder::start(&p, "qcow2", &[]);
    let before = std::fs::read(&p).unwrap();
    // A write is refused with qemu-io's own words.
    let o = diskimg(&["io", "-f", "qcow2", "-c", "write -P 1 0 64k", s(&p)]);
    assert_eq!(code(&o), 1);
    let q = qemu_io_raw(&["-f", "qcow2", "-c", "write -P 1 0 64k", s(&p)]);
    let want = format!(
        "Failed to get \"write\" lock\nIs another process using the image [{}]?\n",
        s(&p)
    );
    assert!(stderr(&q).ends_with(&want), "{}", stderr(&q));
    assert!(stderr(&o).ends_with(&want), "{}", stderr(&o));
    // A plain read-only open is refused too (it would deny the writer its writes) ...
    let a = ["info", s(&p)];
    let (o, q) = (diskimg(&a), qemu_img(&a));
    assert_eq!((code(&o), code(&q)), (1, 1));
    assert_eq!(
        stderr(&o).replace("diskimg:", "qemu-img:"),
        stderr(&q),
        "info next to a writer"
    );
    assert!(stderr(&o).contains("Failed to get shared \"write\" lock"));
    // ... and -U reads next to it, as qemu-img info -U does.
    diskimg_ok(&["info", "-U", s(&p)]);
    diskimg_ok(&["io", "-U", "-r", "-c", "read 0 64k", s(&p)]);
    diskimg_ok(&["map", "-U", s(&p)]);
    // -U on a writable open is refused as qemu refuses it.
    let o = diskimg(&["io", "-U", "-c", "write 0 512", s(&p)]);
    assert!(
        stderr(&o).contains("force-share=on can only be used with read-only images"),
        "{}",
        stderr(&o)
    );
    // Creating over it is refused before the file is touched.
    let o = diskimg(&["create", "-f", "qcow2", s(&p), "1M"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("lock"), "{}", stderr(&o));
    drop(holder);
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "nothing written while held"
    );
    // Released: now the write goes through.
    diskimg_ok(&["io", "-c", "write -P 2 0 64k", s(&p)]);
    diskimg_testutil::assert_qemu_check_clean(&p, "qcow2");
}

#[test]
fn our_writer_excludes_qemu_and_other_writers() {
    let dir = tempdir();
    let p = qcow2(dir.path(), "ours.qcow2");
    let img = diskimg::open(&p, Some(Format::Qcow2), &ImageOptions::read_only(false)).unwrap();
    img.device.write_at(&[7u8; 512], 0).unwrap();
    // A second diskimg writer and qemu's writer are refused.
    let o = diskimg(&["io", "-c", "write 0 512", s(&p)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&o)
    );
    let q = qemu_io_raw(&["-f", "qcow2", "-c", "write 0 512", s(&p)]);
    assert!(!q.status.success());
    assert!(
        stderr(&q).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&q)
    );
    // qemu-img info without -U too; with -U it reads.
    assert_eq!(code(&qemu_img(&["info", s(&p)])), 1);
    qemu_img_ok(&["info", "-U", s(&p)]);
    // The library refuses a second writer in the same process too.
    let e = diskimg::open(&p, None, &ImageOptions::read_only(false)).unwrap_err();
    assert!(matches!(e, diskimg::Error::Locked { .. }), "{e}");
    // close() releases the locks even while the handle lives.
    img.close().unwrap();
    let q = qemu_io_raw(&["-f", "qcow2", "-c", "read -P 7 0 512", s(&p)]);
    assert!(q.status.success(), "{}", stderr(&q));
    drop(img);
    diskimg_ok(&["io", "-c", "write 0 512", s(&p)]);
}

#[test]
fn backing_files_and_raw_images_locked_as_qemu() {
    let dir = tempdir();
    let base = qcow2(dir.path(), "base.qcow2");
    let top = dir.path().join("top.qcow2");
    crate::qemu_overlay("qcow2", s(&base), "qcow2", s(&top));
    let opts = ImageOptions::read_only(false).with_policy(diskimg::OpenPolicy::qemu_compatible());
    let img = diskimg::open(&top, None, &opts).unwrap();
    // The backing file is held read-only: readers welcome, writers not.
    qemu_img_ok(&["info", s(&base)]);
    let q = qemu_io_raw(&["-f", "qcow2", "-c", "write 0 512", s(&base)]);
    assert!(
        stderr(&q).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&q)
    );
    drop(img);
    // A raw image: qemu-io's writer shares writes, ours does not, so each refuses the
    // other's.
    let raw = dir.path().join("d.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let holder = QemuHolder::start(&raw, "raw", &[]);
    let o = diskimg(&["io", "-f", "raw", "-c", "write 0 512", s(&raw)]);
    assert!(
        stderr(&o).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&o)
    );
    diskimg_ok(&["io", "-f", "raw", "-r", "-c", "read 0 512", s(&raw)]);
    drop(holder);
    let img = diskimg::open(&raw, Some(Format::Raw), &ImageOptions::read_only(false)).unwrap();
    let q = qemu_io_raw(&["-f", "raw", "-c", "write 0 512", s(&raw)]);
    assert!(
        stderr(&q).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&q)
    );
    qemu_img_ok(&["info", "-f", "raw", s(&raw)]);
    drop(img);
    let q = qemu_io_raw(&["-f", "raw", "-c", "write 0 512", s(&raw)]);
    assert!(q.status.success(), "{}", stderr(&q));
}

/// Issue 15.4's reproduction: two `diskimg io` writers on one qcow2. The second is refused
/// with qemu's words while the first holds the image, qemu-io is refused too, `-U` reads
/// what the holder wrote, and the image is clean afterwards.
#[test]
fn two_diskimg_writers_the_second_is_refused() {
    let dir = tempdir();
    let p = qcow2(dir.path(), "two.qcow2");
    let bin = env!("CARGO_BIN_EXE_diskimg");
    diskimg_ok(&["io", "-c", "write -P 0x11 0 1M", s(&p)]);
    // The holder only holds (a write of its own could still be running when we look).
    let holder = QemuHolder::start_with(bin, &p, "qcow2", &[]);
    let want = format!(
        "Failed to get \"write\" lock\nIs another process using the image [{}]?\n",
        s(&p)
    );
    let o = diskimg(&["io", "-f", "qcow2", "-c", "write -P 0x22 0 1M", s(&p)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).ends_with(&want), "{}", stderr(&o));
    let q = qemu_io_raw(&["-f", "qcow2", "-c", "write -P 0x33 0 512", s(&p)]);
    assert!(stderr(&q).ends_with(&want), "qemu-io: {}", stderr(&q));
    let q = qemu_img(&["check", s(&p)]);
    assert!(
        stderr(&q).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&q)
    );
    // Readers that share writes are let in, ours and qemu's.
    diskimg_ok(&["io", "-U", "-r", "-c", "read -P 0x11 0 1M", s(&p)]);
    let q = qemu_io_raw(&["-U", "-r", "-f", "qcow2", "-c", "read -P 0x11 0 1M", s(&p)]);
    assert!(q.status.success(), "{}", stderr(&q));
    // Even killed (no close), the holder leaves no lock and a consistent image.
    drop(holder);
    diskimg_testutil::assert_qemu_check_clean(&p, "qcow2");
    diskimg_ok(&["io", "-c", "write -P 0x22 1M 1M", s(&p)]);
    let q = qemu_io_raw(&[
        "-f",
        "qcow2",
        "-c",
        "read -P 0x11 0 1M",
        "-c",
        "read -P 0x22 1M 1M",
        s(&p),
    ]);
    assert!(q.status.success(), "{}", stderr(&q));
}

/// Writers started together: whichever gets the image first writes, the others are
/// refused with qemu's message or run after it — never two at once (before locking, this
/// left hundreds of errors in `qemu-img check`).
#[test]
fn concurrent_writers_never_corrupt() {
    let dir = tempdir();
    let p = qcow2(dir.path(), "race.qcow2");
    let bin = env!("CARGO_BIN_EXE_diskimg");
    let writers: Vec<Child> = (0..4u8)
        .map(|i| {
            let mut args = vec!["io".to_string(), "-f".into(), "qcow2".into()];
            // Each writer allocates clusters interleaved with the others'.
            for k in 0..64u32 {
                let off = (u64::from(k) * 4 + u64::from(i)) * 65536;
                args.push("-c".into());
                args.push(format!("write -P {} {off} 4k", i + 1));
            }
            args.push(s(&p).to_string());
            Command::new(bin)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ran = Vec::new();
    for (i, w) in writers.into_iter().enumerate() {
        let o = w.wait_with_output().unwrap();
        if o.status.success() {
            ran.push(i + 1);
        } else {
            // Two starting at the same instant may both see the other (as with qemu).
            assert!(
                stderr(&o).contains("Failed to get \"write\" lock"),
                "{}",
                stderr(&o)
            );
        }
    }
    diskimg_testutil::assert_qemu_check_clean(&p, "qcow2");
    // Every writer that ran left all of its data.
    for i in ran {
        let mut args = vec!["-f".to_string(), "qcow2".into()];
        for k in 0..64u64 {
            let off = (k * 4 + i as u64 - 1) * 65536;
            args.extend(["-c".into(), format!("read -P {i} {off} 4k")]);
        }
        args.push(s(&p).into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let q = qemu_io_raw(&args);
        let out = String::from_utf8_lossy(&q.stdout);
        assert!(
            q.status.success() && !out.contains("Pattern verification failed"),
            "writer {i}: {out}"
        );
    }
}
