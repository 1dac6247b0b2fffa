//! Format behaviour from qemu-iotests (qcow2 VM state, lazy refcounts, zero writes, raw
//! map under O_DIRECT, ...), each judged by qemu's own programs: the same outputs on the
//! same files, and qemu reading what diskimg wrote.

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

/// `map` of a raw file whose size is not a sector multiple, opened with
/// `cache.direct=on` (iotest 253): the data run at the end of the file counts up to the
/// end of its block, as qemu's file driver rounds it; without O_DIRECT it does not.
#[test]
fn raw_map_of_odd_tail_under_o_direct_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let p = d.join("t.raw");
        std::fs::write(&p, vec![7u8; 1048575]).unwrap();
        let direct = format!(
            "driver=raw,file.driver=file,file.filename={},cache.direct=on",
            s(&p)
        );
        let buffered = format!("driver=raw,file.driver=file,file.filename={}", s(&p));
        [direct, buffered]
            .iter()
            .map(|o| {
                let a = ["map", "--output=json", "--image-opts", o.as_str()];
                let out = if qemu {
                    diskimg_testutil::qemu_img(&a)
                } else {
                    crate::diskimg(&a)
                };
                String::from_utf8_lossy(&out.stdout).to_string()
            })
            .collect()
    };
    let q = outputs_as_qemu(run);
    assert!(q[0].contains("\"length\": 1048576"), "{q:?}");
}

/// Preallocated encrypted images (iotest 188) read as zeroes, to qemu as well; a data
/// file created without preallocation is as long as the disk (iotest 243).
#[test]
fn preallocation_of_encrypted_and_data_file_images() {
    let d = diskimg_testutil::tempdir();
    let t = d.path().join("t.qcow2");
    let obj = "secret,id=sec0,data=astrochicken";
    let opts =
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,preallocation=metadata";
    let o = crate::diskimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        obj,
        "-o",
        opts,
        s(&t),
        "1M",
    ]);
    assert!(o.status.success(), "{o:?}");
    let spec = format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        s(&t)
    );
    let q = crate::qemu_io_raw(&[
        "--object",
        obj,
        "--image-opts",
        &spec,
        "-c",
        "read -P 0 0 1M",
    ]);
    assert!(
        q.status.success() && !crate::iotest_cases::io_text(&q).contains("fail"),
        "{q:?}"
    );
    let map = qemu_img_ok(&[
        "map",
        "--output=json",
        "--object",
        obj,
        "--image-opts",
        &spec,
    ]);
    assert!(
        map.contains("\"data\": true") && !map.contains("\"data\": false"),
        "{map}"
    );
    let r = d.path().join("r.qcow2");
    let data = format!("data_file={}", s(&d.path().join("r.data")));
    crate::diskimg_ok(&["create", "-q", "-f", "qcow2", "-o", &data, s(&r), "64M"]);
    let len = std::fs::metadata(d.path().join("r.data")).unwrap().len();
    assert_eq!(len, 64 << 20);
}
