//! qcow2 behaviour from qemu-iotests (VM state, lazy refcounts, zero writes, ...), each
//! judged by qemu's own programs: the same outputs on the same files, and qemu reading
//! what diskimg wrote.

use diskimg_testutil::qemu_img_ok;

use crate::iotest_cases::{img, io_calls, outputs_as_qemu, v};
use crate::s;

/// `write -b`/`read -b` (iotests 022, 029): the VM state area after the disk survives a
/// snapshot round trip, qemu-io reads what `diskimg io` saved, and the image checks clean.
#[test]
fn vmstate_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let t = img(d, "t.qcow2", "qcow2", "64M");
        qemu_img_ok(&["snapshot", "-c", "a", &t]);
        let calls = vec![
            v(&[
                "-c",
                "write -b -P 0x11 1T 4k",
                "-c",
                "write -b -P 0x22 10M 64k",
                &t,
            ]),
            v(&[
                "-c",
                "read -b -P 0x11 1T 4k",
                "-c",
                "read -b -P 0x22 10M 64k",
                &t,
            ]),
            v(&["-c", "read -b -P 0 2M 4k", &t]),
        ];
        let mut out = io_calls(d, &calls, qemu);
        qemu_img_ok(&["snapshot", "-c", "foo", &t]);
        qemu_img_ok(&["snapshot", "-a", "a", &t]);
        qemu_img_ok(&["snapshot", "-a", "foo", &t]);
        // qemu judges diskimg's image.
        let q = crate::qemu_io_raw(&["-c", "read -b -P 0x11 1T 4k", &t]);
        out.push(crate::iotest_cases::io_text(&q).replace(s(d), "DIR"));
        out.push(qemu_img_ok(&["check", &t]));
        out
    };
    let q = outputs_as_qemu(run);
    assert!(q[1].contains("read 65536/65536"), "{q:?}");
}
