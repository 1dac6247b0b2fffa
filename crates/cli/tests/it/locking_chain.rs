//! Locks on backing chains, as qemu takes them: backing files are held for consistent
//! reads (qemu readers welcome, writers refused), `commit` takes the write lock on the
//! files it writes and `rebase` on the image it changes, with reader locks on the backing
//! files it compares. qemu-img beside every case says what qemu does.

use std::path::{Path, PathBuf};

use diskimg_testutil::{qemu_img, qemu_img_ok, tempdir};

use crate::locking::QemuHolder;
use crate::{code, diskimg, diskimg_ok, qemu_io_raw, s};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// base.qcow2 <- top.qcow2, with data in both, and a spare new.qcow2.
fn chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (base, top, new) = (
        dir.join("base.qcow2"),
        dir.join("top.qcow2"),
        dir.join("new.qcow2"),
    );
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&new), "4M"]);
    crate::qemu_overlay("qcow2", s(&base), "qcow2", s(&top));
    diskimg_testutil::qemu_io(&base, "qcow2", &["write -P 0x11 0 1M"]);
    diskimg_testutil::qemu_io(&top, "qcow2", &["write -P 0x22 1M 64k"]);
    (base, top, new)
}

/// Both refused, each naming a lock.
fn both_refused(ours: &[&str], qemus: &[&str], what: &str) {
    let (o, q) = (diskimg(ours), qemu_img(qemus));
    assert_eq!(code(&o), 1, "{what}: {}", stderr(&o));
    assert_ne!(code(&q), 0, "qemu-img {what}: {}", stderr(&q));
    assert!(
        stderr(&q).contains("lock"),
        "qemu-img {what}: {}",
        stderr(&q)
    );
    assert!(stderr(&o).contains("lock"), "{what}: {}", stderr(&o));
}

#[test]
fn an_open_chain_holds_its_backing_file_for_reading() {
    let dir = tempdir();
    let (base, top, _) = chain(dir.path());
    let bin = env!("CARGO_BIN_EXE_diskimg");
    let holder = QemuHolder::start_with(bin, &top, "qcow2", &[]);
    // The backing file: qemu reads it, but neither qemu nor diskimg writes it.
    let q = qemu_io_raw(&["-r", "-f", "qcow2", "-c", "read -P 0x11 64k 4k", s(&base)]);
    assert!(q.status.success(), "{}", stderr(&q));
    let q = qemu_io_raw(&["-f", "qcow2", "-c", "write 0 4k", s(&base)]);
    assert!(
        stderr(&q).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&q)
    );
    let o = diskimg(&["io", "-c", "write 0 4k", s(&base)]);
    assert!(
        stderr(&o).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&o)
    );
    // The top is written: qemu-img commit cannot take it.
    let q = qemu_img(&["commit", s(&top)]);
    assert_ne!(code(&q), 0);
    drop(holder);
    diskimg_testutil::assert_qemu_check_clean(&top, "qcow2");
}

#[test]
fn commit_and_rebase_lock_what_they_change() {
    let dir = tempdir();
    let (base, top, new) = chain(dir.path());
    let (t, n) = (s(&top), s(&new));
    // A reader of the base (qemu-io -r) keeps a commit out of it, qemu's and ours.
    let holder = QemuHolder::start(&base, "qcow2", &["-r"]);
    both_refused(
        &["commit", t],
        &["commit", t],
        "commit into a base being read",
    );
    drop(holder);
    // A writer on the top keeps both verbs out.
    let holder = QemuHolder::start(&top, "qcow2", &[]);
    both_refused(&["commit", t], &["commit", t], "commit of a top in use");
    both_refused(
        &["rebase", "-u", "-b", "", t],
        &["rebase", "-u", "-b", "", t],
        "rebase of a top in use",
    );
    drop(holder);
    // A writer on the new backing file: a safe rebase must read it consistently.
    let holder = QemuHolder::start(&new, "qcow2", &[]);
    let args = ["rebase", "-b", n, "-F", "qcow2", t];
    both_refused(&args, &args, "rebase onto an image in use");
    drop(holder);
    assert!(qemu_img(&["compare", s(&top), s(&base)]).status.code() == Some(1));
    // Nobody else: both go through and leave clean images.
    diskimg_ok(&args);
    diskimg_ok(&["commit", t]);
    diskimg_testutil::assert_qemu_check_clean(&new, "qcow2");
    diskimg_testutil::qemu_io(&new, "qcow2", &["read -P 0x11 0 1M", "read -P 0x22 1M 64k"]);
}
