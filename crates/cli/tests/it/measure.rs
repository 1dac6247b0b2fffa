//! `measure` against `qemu-img measure` on sizes, target options and real images.

use diskimg_testutil::{qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::{code, diskimg, s};

fn same(args: &[&str]) {
    let (ours, theirs) = (diskimg(args), qemu_img(args));
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "{args:?}"
    );
    assert_eq!(code(&ours), code(&theirs), "{args:?}");
    assert_eq!(
        String::from_utf8_lossy(&ours.stderr).replace("diskimg:", "qemu-img:"),
        String::from_utf8_lossy(&theirs.stderr),
        "{args:?}"
    );
}

#[test]
fn measure_sizes_like_qemu() {
    for size in ["0", "1", "1000", "1M", "64M", "1G", "3T", "100T"] {
        for opts in [
            "",
            "cluster_size=512",
            "cluster_size=4k,refcount_bits=1",
            "cluster_size=2M,refcount_bits=64",
            "extended_l2=on",
            "extended_l2=on,cluster_size=16k",
            "preallocation=metadata",
            "preallocation=falloc,cluster_size=128k",
            "compat=0.10",
        ] {
            for out in ["json", "human"] {
                let o = format!("--output={out}");
                let mut a = vec!["measure", o.as_str(), "-O", "qcow2", "--size", size];
                if !opts.is_empty() {
                    a.extend(["-o", opts]);
                }
                same(&a);
            }
        }
        same(&["measure", "--output=json", "-O", "raw", "--size", size]);
    }
    for bad in [
        vec!["measure", "-O", "vmdk", "--size", "1M"],
        vec!["measure", "-O", "qcow2"],
        vec![
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "--size",
            "1M",
        ],
        vec![
            "measure",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k",
            "--size",
            "1M",
        ],
    ] {
        same(&bad);
    }
}

#[test]
fn measure_images_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "64M"]);
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 1 0 100k",
            "write -z 1M 1M",
            "write -P 2 5M 1",
            "write -c -P 3 8M 64k",
            "write -P 4 33M 3M",
        ],
    );
    let top = d.join("top.qcow2");
    crate::qemu_overlay("qcow2", s(&base), "qcow2", s(&top));
    qemu_io(&top, "qcow2", &["write -P 5 20M 70k"]);
    let v2 = d.join("v2.qcow2");
    qemu_img_ok(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&base),
        s(&v2),
    ]);
    let bm = d.join("bm.qcow2");
    qemu_img_ok(&["convert", "-O", "qcow2", s(&base), s(&bm)]);
    qemu_img_ok(&["bitmap", "--add", "-g", "64k", s(&bm), "b0"]);
    qemu_img_ok(&[
        "bitmap",
        "--add",
        "-g",
        "512",
        s(&bm),
        "a-longer-bitmap-name",
    ]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&base)]);
    qemu_io(&base, "qcow2", &["write -P 6 40M 1M"]);
    let raw = d.join("r.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&raw), "10M"]);
    qemu_io(&raw, "raw", &["write -P 1 4k 4k", "write -P 1 3M 65k"]);
    let vmdk = d.join("v.vmdk");
    qemu_img_ok(&["convert", "-O", "vmdk", s(&raw), s(&vmdk)]);
    for img in [&base, &top, &v2, &bm, &raw, &vmdk] {
        for opts in [
            "",
            "cluster_size=4k",
            "cluster_size=2M",
            "compat=0.10",
            "preallocation=full",
            "backing_file=x.qcow2,backing_fmt=qcow2",
        ] {
            for fmt in ["qcow2", "raw"] {
                if fmt == "raw" && !opts.is_empty() {
                    continue;
                }
                let mut a = vec!["measure", "--output=json", "-O", fmt, s(img)];
                if !opts.is_empty() {
                    a.extend(["-o", opts]);
                }
                same(&a);
            }
        }
    }
    same(&["measure", "-O", "qcow2", s(&bm)]);
    same(&[
        "measure",
        "--output=json",
        "-O",
        "qcow2",
        "-l",
        "s1",
        s(&base),
    ]);
    same(&["measure", "-O", "qcow2", "--size", "1M", s(&base)]);
}
