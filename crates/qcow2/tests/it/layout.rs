//! File layout: the same guest writes and flushes leave an image file exactly as long as
//! qemu's (iotests 121 and 313; the clusters reserved ahead of flushes must not leave
//! refcount blocks or holes behind).

use std::path::Path;

use diskimg_testutil::{assert_qemu_check_clean, qemu_io, tempdir};

use crate::{create, open};

/// One step of a scenario: a write of `len` bytes of `0x11` at `off`, or a guest flush.
#[derive(Clone, Copy)]
enum Step {
    Write(u64, u64),
    Flush,
}

/// Runs `steps` through our driver (one open, closed at the end) and through qemu-io
/// (the same commands in one qemu-io run) on images created with `options` and `size`;
/// asserts the two files have the same length and ours checks clean with qemu.
fn same_length_as_qemu(options: &str, size: u64, runs: &[&[Step]]) {
    let dir = tempdir();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("qemu.qcow2");
    create(&ours, size, options).unwrap();
    diskimg_testutil::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        options,
        theirs.to_str().unwrap(),
        &size.to_string(),
    ]);
    for (k, steps) in runs.iter().enumerate() {
        run_ours(&ours, steps);
        let cmds: Vec<String> = steps
            .iter()
            .map(|s| match s {
                Step::Write(o, l) => format!("write -P 0x11 {o} {l}"),
                Step::Flush => "flush".into(),
            })
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&theirs, "qcow2", &cmds);
        assert_eq!(
            len(&ours),
            len(&theirs),
            "{options}: file length after run {k} (ours, qemu)"
        );
    }
    assert_qemu_check_clean(&ours, "qcow2");
}

fn run_ours(p: &Path, steps: &[Step]) {
    let dev = open(p, false);
    for s in steps {
        match *s {
            Step::Write(o, l) => dev.write_at(&vec![0x11; l as usize], o).unwrap(),
            Step::Flush => dev.flush().unwrap(),
        }
    }
    dev.close().unwrap();
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// iotest 121: filling the first refcount block exactly, then one cluster more.
#[test]
fn refcount_block_boundary_matches_qemu() {
    same_length_as_qemu(
        "cluster_size=512,refcount_bits=16",
        1 << 20,
        &[&[Step::Write(0, 124 << 10)], &[Step::Write(124 << 10, 512)]],
    );
}

/// iotest 313: one big write over several refcount blocks (64-bit refcounts).
#[test]
fn big_write_over_refcount_blocks_matches_qemu() {
    let size = (510 * 4 + 1 - 3) * 4096;
    same_length_as_qemu(
        "cluster_size=4096,refcount_bits=64",
        size,
        &[&[Step::Write(0, size)]],
    );
}

/// Writes after a guest flush that need new L2 tables and data clusters: they use the
/// reserve from its front, so nothing is left between the old end and the new clusters.
#[test]
fn writes_after_flushes_match_qemu() {
    use Step::{Flush, Write};
    same_length_as_qemu(
        "cluster_size=4096",
        1 << 30,
        &[
            &[Write(0, 64 << 10), Flush, Write(512 << 20, 8 << 10), Flush],
            &[Write(1 << 20, 4096), Flush, Write(768 << 20, 4096)],
            &[
                Write(64 << 10, 256 << 10),
                Flush,
                Flush,
                Write(900 << 20, 4096),
            ],
        ],
    );
}
