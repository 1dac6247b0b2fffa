//! qcow2 allocation-path errors through a blkdebug node below the format (iotest 026):
//! a rule fails the I/O that follows one of qemu's qcow2 events, and qemu-io and
//! `diskimg io` must fail the same write with the same error, fail (or not) the flush at
//! close the same way, and leave an image `qemu-img check` finds free of corruption
//! (leaks are allowed, as the iotest allows them).

use diskimg_testutil::{qemu_img, qemu_img_ok, tempdir};

use super::iotest_cases::{io_calls, v};
use crate::s;

/// One case: `write [-b] 0 size` on a fresh 1G image of `cluster` bytes through a rule on
/// `event` (`errno`, `once`); for `l2_update` a first write outside the rule allocates
/// the L2 table, as in the iotest.
struct Case {
    event: &'static str,
    errno: u32,
    once: bool,
    vmstate: bool,
    size: &'static str,
    cluster: &'static str,
}

/// The case run with qemu-io (`qemu`) or `diskimg io`: the write's output (program
/// prefixes dropped) and what `qemu-img check` says (leaks count as clean).
fn run(d: &std::path::Path, c: &Case, qemu: bool) -> Vec<String> {
    let img = d.join("t.qcow2");
    let conf = d.join("blkdebug.conf");
    std::fs::write(
        &conf,
        format!(
            "[inject-error]\nevent = \"{}\"\nerrno = \"{}\"\nimmediately = \"off\"\nonce = \"{}\"\n",
            c.event,
            c.errno,
            if c.once { "on" } else { "off" }
        ),
    )
    .unwrap();
    let cs = format!("cluster_size={}", c.cluster);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &cs, s(&img), "1G"]);
    let b = if c.vmstate { "-b " } else { "" };
    let mut calls = Vec::new();
    if c.event == "l2_update" {
        calls.push(v(&[
            "-f",
            "qcow2",
            "-c",
            &format!("write {b}0 512"),
            s(&img),
        ]));
    }
    let node = format!("blkdebug:{}:{}", s(&conf), s(&img));
    calls.push(v(&["-c", &format!("write {b}0 {}", c.size), &node]));
    let mut out: Vec<String> = io_calls(d, &calls, qemu)
        .into_iter()
        .map(|o| o.replace("qemu-io: ", "").replace("diskimg: ", ""))
        .collect();
    let check = qemu_img(&["check", s(&img)]);
    let rc = check.status.code().unwrap_or(-1);
    assert!(
        rc == 0 || rc == 3,
        "{} {} (qemu: {qemu}): {}",
        c.event,
        c.once,
        String::from_utf8_lossy(&check.stdout)
    );
    out.push(format!("check: {}", if rc == 3 { 0 } else { rc }));
    out
}

fn same_as_qemu(c: &Case) -> Vec<String> {
    let (qd, dd) = (tempdir(), tempdir());
    let q = run(qd.path(), c, true);
    let d = run(dd.path(), c, false);
    assert_eq!(d, q, "event {} once {} -b {}", c.event, c.once, c.vmstate);
    q
}

/// The L1/L2/refcount-block update events of 026's first group: the write fails with
/// the rule's errno; a rule that stays on also fails the flush at close (both of
/// qemu's cache messages). `cluster_alloc` fails a read first, so nothing was written
/// and the close has nothing to flush.
#[test]
fn qcow2_allocation_events_fail_as_qemu() {
    for (event, errno, once, vmstate) in [
        ("l1_update", 5, true, false),
        ("l1_update", 28, false, true),
        ("l2_update", 5, false, false),
        ("l2_update", 28, true, true),
        ("l2_alloc_write", 28, false, false),
        ("refblock_update_part", 5, true, false),
        ("refblock_alloc", 28, false, true),
        ("cluster_alloc", 5, false, false),
    ] {
        let c = Case {
            event,
            errno,
            once,
            vmstate,
            size: "128k",
            cluster: "1024",
        };
        let out = same_as_qemu(&c);
        let why = if errno == 5 {
            "Input/output error"
        } else {
            "No space left on device"
        };
        let text = out.join("\n");
        assert!(text.contains(&format!("write failed: {why}")), "{text}");
        let flush_fails = !once && event != "cluster_alloc";
        assert_eq!(
            text.contains("Failed to flush the L2 table cache"),
            flush_fails,
            "{text}"
        );
    }
}

/// Refcount table growth (512-byte clusters: the table covers 8 MiB) and L1 table growth
/// (`write -b` past the L1 table): errors at each step of either fail the write as qemu's.
#[test]
fn qcow2_table_growth_events_fail_as_qemu() {
    for (event, once, vmstate, size, cluster) in [
        ("refblock_alloc_write_table", false, false, "12M", "512"),
        ("refblock_alloc_switch_table", true, false, "12M", "512"),
        ("refblock_alloc_hookup", false, true, "1M", "512"),
        ("l1_grow_alloc_table", false, true, "64k", "1024"),
        ("l1_grow_write_table", false, true, "64k", "1024"),
        ("l1_grow_activate_table", true, true, "64k", "1024"),
    ] {
        let c = Case {
            event,
            errno: 28,
            once,
            vmstate,
            size,
            cluster,
        };
        let text = same_as_qemu(&c).join("\n");
        assert!(
            text.contains("write failed: No space left on device"),
            "{text}"
        );
    }
}

/// A data write that fails once leaves no leaked clusters: the second write of the same
/// range succeeds and check is clean (026's "Avoid cluster leaks after temporary
/// failure").
#[test]
fn failed_data_write_leaks_nothing() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let img = d.join("t.qcow2");
        let conf = d.join("blkdebug.conf");
        std::fs::write(
            &conf,
            "[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nonce = \"on\"\n",
        )
        .unwrap();
        let cs = "cluster_size=1024";
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", cs, s(&img), "64M"]);
        let node = format!("blkdebug:{}:{}", s(&conf), s(&img));
        let calls = [v(&["-c", "write 0 1M", "-c", "write 0 1M", &node])];
        let mut out = io_calls(d, &calls, qemu);
        let check = qemu_img(&["check", s(&img)]);
        out.push(String::from_utf8_lossy(&check.stdout).replace(s(d), "DIR"));
        out
    };
    let (qd, dd) = (tempdir(), tempdir());
    let q = run(qd.path(), true);
    assert_eq!(run(dd.path(), false), q);
    assert!(q[1].contains("No errors were found on the image."), "{q:?}");
}
