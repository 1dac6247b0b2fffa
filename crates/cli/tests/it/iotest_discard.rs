//! qcow2 discard, preallocation and shrink as qemu lays them out (iotests 250, 271):
//! each scenario runs with qemu-img/qemu-io and with diskimg on fresh files, and the
//! outputs (`map` host offsets, L2 entries, host usage) must be equal.

use std::os::unix::fs::MetadataExt;

use diskimg_testutil::qemu_img_ok;

use crate::iotest_cases::{img_tool, io_calls, outputs_as_qemu, v};
use crate::s;

/// Host bytes the file occupies (`du --block-size=1`).
fn usage(p: &str) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// `qemu-img map` (human) of `t`, directory shown as DIR.
fn map(d: &std::path::Path, qemu: bool, t: &str) -> String {
    let o = img_tool(qemu, &["map", t]);
    String::from_utf8_lossy(&o.stdout).replace(s(d), "DIR")
}

/// iotest 250, smaller: discarded preallocated clusters are reused first-fit by the
/// next writes (with qemu-io's writeback cache, as the harness runs it), `map` does not
/// show never-written preallocated clusters as data, and a shrink punches the freed
/// clusters and truncates the file's tail (the same host usage change as qemu's).
#[test]
fn discard_reuse_and_shrink_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let t = s(&d.join("t.qcow2")).to_string();
        let o = "cluster_size=1M,preallocation=metadata";
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", o, &t, "300M"]);
        let calls = vec![v(&[
            "-t",
            "writeback",
            "-c",
            "discard 0 10M",
            "-c",
            "discard 290M 10M",
            "-c",
            "write 290M 10M",
            "-c",
            "write 0 10M",
            &t,
        ])];
        let mut out = io_calls(d, &calls, qemu);
        out.push(map(d, qemu, &t));
        let before = usage(&t);
        let r = img_tool(qemu, &["resize", "--shrink", &t, "5M"]);
        assert!(r.status.success(), "{r:?}");
        out.push(format!("delta {}", before.saturating_sub(usage(&t))));
        out.push(format!("len {}", std::fs::metadata(&t).unwrap().len()));
        out.push(qemu_img_ok(&["check", &t]));
        out
    };
    let q = outputs_as_qemu(run);
    assert!(q[1].contains("0x12700000"), "{q:?}");
    assert_eq!(q[2], "delta 15728640", "{q:?}");
}
