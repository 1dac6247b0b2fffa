//! `diskimg serve` holds the image's locks as qemu-nbd does (issue 17): while a writable
//! export runs, qemu-io, qemu-img and another diskimg cannot write the file (qemu's
//! `Failed to get "write" lock`) and plain readers are refused; `-r` lets readers in;
//! `-r -U` lets writers in too; a server cannot start on an image qemu holds.

use std::path::Path;

use diskimg_testutil::{qemu_img, qemu_img_ok, tempdir};

use crate::serve::{Served, tool};
use crate::{code, diskimg, qemu_io_raw, s};

/// `diskimg serve ARGS` expected to fail at once; bounded (coreutils `timeout`) in case
/// it serves instead.
fn serve_refused(args: &[&str]) -> std::process::Output {
    std::process::Command::new("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_diskimg"))
        .arg("serve")
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn qcow2(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("served.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    p
}

/// qemu-io writing the file directly (not through the export).
fn qemu_write(p: &Path) -> std::process::Output {
    qemu_io_raw(&["-f", "qcow2", "-c", "write -P 0x44 0 64k", s(p)])
}

#[test]
fn writable_export_excludes_qemu_and_diskimg_writers() {
    let dir = tempdir();
    let p = qcow2(dir.path());
    let srv = Served::diskimg(dir.path(), "rw", &["-f", "qcow2", s(&p)]);
    // Clients write through the export ...
    let uri = srv.uri();
    let q = qemu_io_raw(&["-f", "raw", "-c", "write -P 0x33 0 64k", &uri]);
    assert!(q.status.success(), "{}", stderr(&q));
    // ... but nobody writes the file behind the server's back, qemu as with qemu-nbd.
    let want = format!(
        "Failed to get \"write\" lock\nIs another process using the image [{}]?\n",
        s(&p)
    );
    let q = qemu_write(&p);
    assert!(stderr(&q).ends_with(&want), "{}", stderr(&q));
    let o = diskimg(&["io", "-c", "write 0 512", s(&p)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).ends_with(&want), "{}", stderr(&o));
    let q = qemu_img(&["resize", s(&p), "32M"]);
    assert_eq!(code(&q), 1, "{}", stderr(&q));
    // Plain readers would deny the server its writes: refused; -U reads.
    let q = qemu_img(&["info", s(&p)]);
    assert!(stderr(&q).contains("Failed to get shared \"write\" lock"));
    qemu_img_ok(&["info", "-U", s(&p)]);
    // A second server on the same image is refused, with or without -r.
    let o = serve_refused(&["-k", s(&dir.path().join("b.sock")), s(&p)]);
    assert!(
        stderr(&o).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&o)
    );
    let o = serve_refused(&["-r", "-k", s(&dir.path().join("c.sock")), s(&p)]);
    assert!(stderr(&o).contains("lock"), "{}", stderr(&o));
    srv.stop();
    // Stopped: the locks are gone and the client's write is in a clean image.
    let q = qemu_io_raw(&["-f", "qcow2", "-c", "read -P 0x33 0 64k", s(&p)]);
    assert!(q.status.success(), "{}", stderr(&q));
    diskimg_testutil::assert_qemu_check_clean(&p, "qcow2");
}

#[test]
fn read_only_and_force_share_exports_as_qemu_nbd() {
    let dir = tempdir();
    let p = qcow2(dir.path());
    // -r: readers welcome, writers not.
    let srv = Served::diskimg(dir.path(), "ro", &["-r", "-f", "qcow2", s(&p)]);
    qemu_img_ok(&["info", s(&p)]);
    let q = qemu_write(&p);
    assert!(
        stderr(&q).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&q)
    );
    srv.stop();
    // -r -U: qemu may write while we serve. qemu-nbd 10 has no -U: its spelling is
    // --image-opts force-share=on, which we take too.
    let srv = Served::diskimg(dir.path(), "ru", &["-r", "-U", "-f", "qcow2", s(&p)]);
    let q = qemu_write(&p);
    assert!(q.status.success(), "{}", stderr(&q));
    srv.stop();
    let opts = format!("driver=qcow2,file.filename={},force-share=on", s(&p));
    let srv = Served::diskimg(dir.path(), "ro", &["-r", "--image-opts", &opts]);
    let q = qemu_write(&p);
    assert!(q.status.success(), "--image-opts: {}", stderr(&q));
    srv.stop();
    let nbd = Served::qemu_nbd(dir.path(), "qn", &["-r", "--image-opts", &opts]);
    let q = qemu_write(&p);
    assert!(q.status.success(), "qemu-nbd: {}", stderr(&q));
    drop(nbd);
    // Without -r, force-share is refused by both.
    let o = tool(
        "qemu-nbd",
        &["-k", s(&dir.path().join("n.sock")), "--image-opts", &opts],
    );
    assert!(
        stderr(&o).contains("force-share=on can only be used with read-only images"),
        "{}",
        stderr(&o)
    );
    // -U on a writable export is refused, as qemu-nbd refuses it.
    let o = serve_refused(&["-U", "-k", s(&dir.path().join("u.sock")), s(&p)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("force-share=on can only be used with read-only images"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn no_export_of_an_image_qemu_nbd_serves() {
    let dir = tempdir();
    let p = qcow2(dir.path());
    let nbd = Served::qemu_nbd(dir.path(), "q", &["-f", "qcow2", s(&p)]);
    let o = serve_refused(&["-k", s(&dir.path().join("d.sock")), s(&p)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&o)
    );
    // Read-only with -U still exports it (as qemu-nbd -r with force-share=on would).
    let srv = Served::diskimg(dir.path(), "d2", &["-r", "-U", "-f", "qcow2", s(&p)]);
    srv.stop();
    drop(nbd);
}
