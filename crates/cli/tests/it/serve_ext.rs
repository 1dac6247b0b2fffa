//! NBD extended headers with a real client: qemu-io and qemu-img (10.x) ask for
//! `NBD_OPT_EXTENDED_HEADERS` first and then send 64-bit lengths. Through `diskimg serve`
//! they negotiate them (qemu's own trace says so), a 6 GiB write-zeroes goes out as one
//! request, and the image and its map through the export end as through qemu-nbd.
//! nbdinfo and nbdcopy (libnbd 1.14 here) keep structured replies: serve.rs.

use diskimg_testutil::{qemu_img_ok, qemu_io, tempdir};

use crate::s;
use crate::serve::{Served, tool, visible_map};

/// qemu-io through an NBD URI with qemu's NBD trace events on; returns stdout+stderr.
fn traced_qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec![
        "--trace",
        "nbd_receive_option_reply",
        "--trace",
        "nbd_send_request",
        "-f",
        "raw",
    ];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(uri);
    let o = tool("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && !text.contains("fail"), "{text}");
    text
}

#[test]
fn qemu_clients_use_extended_headers_like_with_qemu_nbd() {
    let dir = tempdir();
    let mut imgs = Vec::new();
    for name in ["ours", "theirs"] {
        let p = dir.path().join(format!("{name}.qcow2"));
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), "8G"]);
        qemu_io(&p, "qcow2", &["write -P 1 5G 64k", "write -P 2 7G 1M"]);
        imgs.push(p);
    }
    let ours = Served::diskimg(dir.path(), "x-d", &["-f", "qcow2", s(&imgs[0])]);
    let theirs = Served::qemu_nbd(dir.path(), "x-q", &["-f", "qcow2", s(&imgs[1])]);
    let script = [
        "write -z -u -n 1G 6G",
        "write -P 3 6G 64k",
        "read -P 0 5G 64k",
        "read -P 2 7G 1M",
    ];
    for srv in [&ours, &theirs] {
        let out = traced_qemu_io(&srv.uri(), &script);
        assert!(
            out.contains("option reply 11 (extended headers), type 1 (ack)"),
            "extended headers not negotiated: {out}"
        );
        // The 6 GiB write-zeroes is one request: its length needs 64 bits.
        assert!(
            out.contains(".len = 6442450944") && out.contains("(write zeroes)"),
            "{out}"
        );
    }
    // Block status through the export (64-bit extents) as qemu-nbd reports it.
    assert_eq!(
        visible_map(&ours.uri(), &[]),
        visible_map(&theirs.uri(), &[])
    );
    ours.stop();
    theirs.stop();
    qemu_img_ok(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        s(&imgs[0]),
        s(&imgs[1]),
    ]);
    assert_eq!(
        visible_map(s(&imgs[0]), &["-f", "qcow2"]),
        visible_map(s(&imgs[1]), &["-f", "qcow2"])
    );
}
