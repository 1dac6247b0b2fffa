//! `commit` into a base that runs out of space (a qcow2 base on a size-limited `raw`
//! node) stops where qemu-img's stops: the base keeps the same number of data clusters
//! (qemu copies in requests of at most 1 MiB and keeps every one that fitted).

use diskimg_testutil::{qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::iotest_close::raw_node_json;
use crate::{diskimg, s};

/// Data bytes of the base (through its size-limited node) after `commit` of 32 MiB of
/// data with qemu-img or with us, when the node leaves `room` clusters free.
fn committed(qemu: bool, room: u64) -> u64 {
    let d = tempdir();
    let (base, top) = (d.path().join("b.qcow2"), d.path().join("t.qcow2"));
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "1G"]);
    let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    let len = f.metadata().unwrap().len().div_ceil(65536) * 65536 + room * 65536;
    f.set_len(len).unwrap();
    let json = raw_node_json(s(&base), len);
    crate::qemu_overlay("qcow2", &json, "qcow2", s(&top));
    qemu_io(&top, "qcow2", &["write -P 7 0 32M"]);
    let o = if qemu {
        qemu_img(&["commit", s(&top)])
    } else {
        diskimg(&["commit", s(&top)])
    };
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.ends_with("Block job failed: No space left on device\n"),
        "qemu {qemu}: {err}"
    );
    let map = qemu_img_ok(&["map", "--output=json", &json]);
    crate::convert::data_bytes(&serde_json::from_str(&map).unwrap())
}

#[test]
fn commit_out_of_space_keeps_what_qemu_keeps() {
    for room in [37, 180, 256] {
        let q = committed(true, room);
        assert!(q > 0, "room {room}: qemu committed nothing");
        assert_eq!(committed(false, room), q, "room {room}: bytes committed");
    }
}
