//! The first write after an open gives the descriptor a new CID, byte for byte as
//! qemu-io's does (qemu's `vmdk_write_cid`): a descriptor file is rewritten whole,
//! rounded up to 512-byte sectors with NULs; an embedded descriptor keeps its area.
//! Twin images from qemu-img, one written by qemu-io and one by us, are compared with
//! the CID values masked.

use std::path::Path;

use diskimg_testutil::{qemu_img_ok, qemu_io, tempdir};

use crate::common::{open, p};

/// The descriptor's bytes: `(text before the first NUL with the CID value masked,
/// total length)`, after checking that every byte behind the NUL is zero or what the
/// original text held there (qemu leaves the old text's tail when the new CID is
/// shorter).
fn shape(bytes: &[u8], orig: &[u8]) -> (String, usize) {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    for (i, &b) in bytes.iter().enumerate().skip(end + 1) {
        assert!(
            b == 0 || orig.get(i) == Some(&b),
            "byte {i} behind the text"
        );
    }
    let text = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let masked: Vec<String> = text
        .split_inclusive('\n')
        .map(|l| {
            if l.starts_with("CID=") {
                "CID=X\n".into()
            } else {
                l.into()
            }
        })
        .collect();
    (masked.concat(), bytes.len())
}

/// Creates `NAME.vmdk` with qemu-img in two directories, lets `extra` change the
/// descriptor file, writes 4 KiB to one with qemu-io and to the other with us.
fn twins(opts: &str, extra: &dyn Fn(&Path)) -> [(Vec<u8>, Vec<u8>); 2] {
    let (qd, dd) = (tempdir(), tempdir());
    let mut out = Vec::new();
    for (i, d) in [&qd, &dd].into_iter().enumerate() {
        let f = d.path().join("t.vmdk");
        qemu_img_ok(&["create", "-q", "-f", "vmdk", "-o", opts, &p(&f), "10M"]);
        extra(&f);
        let orig = std::fs::read(&f).unwrap();
        if i == 0 {
            qemu_io(&f, "vmdk", &["write -P 1 0 4k"]);
        } else {
            let dev = open(&f, false).unwrap();
            dev.write_at(&[1u8; 4096], 0).unwrap();
            dev.close().unwrap();
        }
        out.push((std::fs::read(&f).unwrap(), orig));
    }
    [out.remove(0), out.remove(0)]
}

#[test]
fn monolithic_flat_descriptor_padded_as_qemu() {
    let [(q, qo), (d, dorig)] = twins("subformat=monolithicFlat", &|_| {});
    assert_eq!(q.len(), 512, "qemu pads the 339-byte descriptor");
    assert_eq!(shape(&d, &dorig), shape(&q, &qo));
    // A descriptor of 730 bytes becomes 1024.
    let longer = |f: &Path| {
        let mut t = std::fs::read_to_string(f).unwrap();
        for i in 0..10 {
            t.push_str(&format!("# padding comment line number {i} ......\n"));
        }
        std::fs::write(f, t).unwrap();
    };
    let [(q, qo), (d, dorig)] = twins("subformat=monolithicFlat", &longer);
    assert_eq!(q.len(), 1024);
    assert_eq!(shape(&d, &dorig), shape(&q, &qo));
}

#[test]
fn embedded_and_split_descriptors_as_qemu() {
    for sub in [
        "monolithicSparse",
        "twoGbMaxExtentFlat",
        "twoGbMaxExtentSparse",
    ] {
        let [(q, qo), (d, dorig)] = twins(&format!("subformat={sub}"), &|_| {});
        if sub == "monolithicSparse" {
            // The descriptor area (sector 1, 20 sectors) as text, the rest as bytes.
            let (qa, da) = (&q[512..512 + 10240], &d[512..512 + 10240]);
            assert_eq!(shape(da, &dorig[512..]), shape(qa, &qo[512..]), "{sub}");
            assert_eq!(q.len(), d.len(), "{sub}");
        } else {
            assert_eq!(shape(&d, &dorig), shape(&q, &qo), "{sub}");
        }
    }
}
