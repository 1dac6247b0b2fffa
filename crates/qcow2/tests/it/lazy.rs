//! Lazy refcounts (compat 1.1 `lazy_refcounts=on`, the "dirty" incompatible bit): the
//! first allocating write sets the bit, refcounts stay in memory until a clean close
//! clears it, a crash leaves the image dirty with qemu's `check` verdict (iotest 039),
//! and the next read-write open repairs it. Crash consistency: at every cut of a
//! workload, the repaired image checks clean (ours and qemu's) and every block reads
//! what it held at the last flush or what was written since — no dangling reference.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskimg_blockio::{CrashMode, Driver, MemStorage, OpenOptions, Storage};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{qemu_check_json, qemu_img_ok, read_all, tempdir};

use crate::crash_harness::{Workload, Write, assert_old_or_new, crash_images, image};

const SIZE: u64 = 4 << 20;
const BLOCK: usize = 4096;
const CLUSTER: u64 = 65536;

/// The incompatible feature bits of the header in `img`.
fn incompatible(img: &[u8]) -> u64 {
    u64::from_be_bytes(img[72..80].try_into().unwrap())
}

/// Small writes into fresh clusters, some into the same cluster, with a flush every 4
/// writes, on an image with lazy refcounts.
fn workload() -> Workload {
    let ops = (0..24u64)
        .map(|k| {
            let c = (k * 7) % (SIZE / CLUSTER);
            Write {
                off: c * CLUSTER + (k % 4) * BLOCK as u64,
                len: BLOCK,
                byte: 1 + k as u8,
            }
        })
        .collect();
    Workload {
        initial: image(SIZE, "compat=1.1,lazy_refcounts=on"),
        size: SIZE,
        ops,
        every: 4,
        open: OpenOptions::new(),
    }
}

#[test]
fn clean_close_clears_the_dirty_bit() {
    let clean = workload().run(None);
    let img = clean.fs.crash_image(CrashMode::DropUnflushed);
    assert_eq!(incompatible(&img) & 1, 0);
    let dir = tempdir();
    let path = dir.path().join("clean.qcow2");
    std::fs::write(&path, &img).unwrap();
    let (v, code) = qemu_check_json(&path, "qcow2");
    assert_eq!(code, 0, "{v}");
    assert!(read_all(crate::open(&path, true).as_ref()) == clean.durable);
}

#[test]
fn crash_at_every_cut_is_repaired_at_open() {
    let w = workload();
    let count = w.run(None).fs.ops();
    let dir = tempdir();
    let path = dir.path().join("crash.qcow2");
    let mut dirty_seen = false;
    for cut in 0..count {
        let o = w.run(Some(cut));
        for (mode, img, _) in crash_images(&o.fs, cut, &OpenOptions::new().read_only(true)) {
            let what = format!("cut {cut} {mode:?}");
            let dirty = incompatible(&img) & 1 != 0;
            dirty_seen |= dirty;
            let s = Arc::new(MemStorage::from_vec(img));
            let dev = DRIVER.open(s.clone(), &OpenOptions::new()).unwrap();
            crate::assert_cut_checks_clean(dev.as_ref(), &what);
            assert_old_or_new(&read_all(dev.as_ref()), &o, BLOCK, &what);
            drop(dev);
            if cut.is_multiple_of(4) {
                let mut out = vec![0u8; s.len().unwrap() as usize];
                s.read_exact_at(&mut out, 0).unwrap();
                assert_eq!(incompatible(&out) & 1, 0, "{what}");
                std::fs::write(&path, &out).unwrap();
                // Repaired when dirty; before the bit, a crash may leak (never corrupt).
                let (v, code) = qemu_check_json(&path, "qcow2");
                let leaks = v["leaks"].as_u64().unwrap_or(0);
                assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{what}: {v}");
                assert!(
                    code == 0 || (!dirty && code == 3 && leaks > 0),
                    "{what}: {v}"
                );
            }
        }
    }
    assert!(dirty_seen, "no cut left the image dirty");
}

/// Runs qemu-io on `path` with `cmds`, then `sigraise 9` (the process dies).
fn qemu_io_killed(path: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for x in cmds.iter().chain(&["sigraise 9"]) {
        c.args(["-c", x]);
    }
    let out = c
        .arg(path)
        .output()
        .expect("qemu-io (qemu-utils) must be installed");
    assert!(!out.status.success());
}

/// A crash after a writethrough write leaves qemu's image and ours with the same
/// header bits and the same `qemu-img check` verdict (iotest 039); with lazy refcounts
/// off, both are clean.
#[test]
fn killed_after_write_matches_qemu() {
    let dir = tempdir();
    for lazy in ["on", "off"] {
        let (q, d) = (dir.path().join("q.qcow2"), dir.path().join("d.qcow2"));
        for p in [&q, &d] {
            let o = format!("compat=1.1,lazy_refcounts={lazy}");
            qemu_img_ok(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &o,
                &p.to_string_lossy(),
                "128M",
            ]);
        }
        qemu_io_killed(&q, &["write -P 0x5a 0 512"]);
        let dev = crate::open(&d, false);
        dev.write_at(&[0x5a; 512], 0).unwrap();
        dev.flush().unwrap();
        // A crash: no close, no destructor.
        std::mem::forget(dev);
        let (a, b) = (std::fs::read(&q).unwrap(), std::fs::read(&d).unwrap());
        assert_eq!(incompatible(&a), incompatible(&b), "lazy_refcounts={lazy}");
        let (vq, cq) = qemu_check_json(&q, "qcow2");
        let (vd, cd) = qemu_check_json(&d, "qcow2");
        assert_eq!(cq, cd, "lazy_refcounts={lazy}: {vq} vs {vd}");
        for k in ["corruptions", "leaks", "check-errors"] {
            assert_eq!(vq[k], vd[k], "lazy_refcounts={lazy} {k}: {vq} vs {vd}");
        }
        // The next read-write open repairs ours.
        drop(crate::open(&d, false));
        assert_eq!(qemu_check_json(&d, "qcow2").1, 0);
    }
}
