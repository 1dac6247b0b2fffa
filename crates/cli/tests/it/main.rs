#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! The `diskimg` binary side by side with qemu-img / qemu-io on the same files.
//!
//! Format-generic tests loop over [`FORMATS`]: adding a format is one line there.

mod amend;
mod backing_errors;
mod bench;
mod bitmap;
mod bitmap_live;
mod bounded;
mod check_repair;
mod checksum;
mod close_both;
mod commit_enospc;
mod commit_rebase;
mod compare;
mod convert;
mod convert_cache;
mod convert_perf;
mod convert_progress;
mod convert_zero_head;
mod corrupt_events;
mod create_info;
mod dd_resize;
mod encrypt;
mod errors;
mod format_guard;
mod guest;
mod hostfiles;
mod hostile;
mod inspect;
mod io;
mod iotest_behaviour;
mod iotest_blkdebug;
mod iotest_cases;
mod iotest_close;
mod iotest_datafile;
mod iotest_discard;
mod iotest_filters;
mod iotest_names;
mod iotest_options;
mod iotest_snapshots;
mod iotest_subclusters;
mod locking;
mod locking_chain;
mod luks;
mod map;
mod map_formats;
mod map_vpc;
mod measure;
mod offload;
mod open_errors;
mod open_protocols;
mod pipelines;
mod pipelines_out;
mod pipelines_targets;
mod progress;
mod qemu_io;
mod qemu_layout;
mod serve;
mod serve_activation;
mod serve_cache;
mod serve_ext;
mod serve_formats;
mod serve_lock;
mod serve_write;
mod servers;
mod snapshot;
mod snapshot_parity;
mod zero_unmap;

use std::path::Path;
use std::process::{Command, Output};

/// Formats exercised by the format-generic tests.
pub const FORMATS: &[&str] = &["raw", "qcow2", "vdi", "vpc", "vmdk", "vhdx"];

/// Runs the diskimg binary.
pub fn diskimg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diskimg"))
        .args(args)
        .output()
        .expect("run diskimg")
}

/// Runs diskimg, asserting exit 0; returns stdout.
pub fn diskimg_ok(args: &[&str]) -> String {
    let o = diskimg(args);
    assert!(
        o.status.success(),
        "diskimg {args:?} failed ({:?}): {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs qemu-io with arbitrary arguments (no success assertion).
pub fn qemu_io_raw(args: &[&str]) -> Output {
    Command::new("qemu-io")
        .args(args)
        .output()
        .expect("run qemu-io (install qemu-utils)")
}

/// A path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit code of an output.
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// `qemu-img create -q -f FMT -b BACKING -F BACKING_FMT TOP`: an overlay made by qemu-img
/// (its size is the backing file's).
pub fn qemu_overlay(fmt: &str, backing: &str, backing_fmt: &str, top: &str) {
    diskimg_testutil::qemu_create_overlay(top, fmt, backing, backing_fmt, None);
}

/// A sparse raw image of `size` bytes made by qemu-img with qemu-io writes applied.
pub fn qemu_raw(dir: &Path, name: &str, size: &str, cmds: &[&str]) -> std::path::PathBuf {
    let p = dir.join(name);
    diskimg_testutil::qemu_img_ok(&["create", "-q", "-f", "raw", s(&p), size]);
    if !cmds.is_empty() {
        diskimg_testutil::qemu_io(&p, "raw", cmds);
    }
    p
}
