//! `convert` to qcow2 leaves the file qemu-img leaves: a source whose data ends inside a
//! cluster (here 4 KiB written at 60 MiB) gives a file reaching the end of that cluster,
//! byte for byte as qemu-img's, and `qemu-img check` reports the same image end offset.

use diskimg_testutil::{qemu_img_ok, tempdir};

use crate::{diskimg_ok, qemu_raw, s};

#[test]
fn convert_to_qcow2_is_byte_identical_to_qemu_img() {
    let dir = tempdir();
    let src = qemu_raw(
        dir.path(),
        "src.raw",
        "64M",
        &["write -P 1 0 1M", "write -P 2 10M 3M", "write -P 3 60M 4k"],
    );
    for opts in ["cluster_size=64k", "cluster_size=2M", "cluster_size=4k"] {
        let (q, d) = (dir.path().join("q.qcow2"), dir.path().join("d.qcow2"));
        let conv = |tool: &dyn Fn(&[&str]) -> String, out: &std::path::Path| {
            let args = ["convert", "-f", "raw", "-O", "qcow2", "-o", opts];
            let mut a = args.to_vec();
            a.extend([s(&src), s(out)]);
            tool(&a);
        };
        conv(&|a| qemu_img_ok(a), &q);
        conv(&|a| diskimg_ok(a), &d);
        let end = |p: &std::path::Path| {
            let out = qemu_img_ok(&["check", s(p)]);
            out.lines().last().unwrap().to_owned()
        };
        assert_eq!(end(&d), end(&q), "{opts}");
        let (qb, db) = (std::fs::read(&q).unwrap(), std::fs::read(&d).unwrap());
        assert_eq!(db.len(), qb.len(), "{opts}: file length");
        assert!(db == qb, "{opts}: bytes differ");
        std::fs::remove_file(&q).unwrap();
        std::fs::remove_file(&d).unwrap();
    }
}
