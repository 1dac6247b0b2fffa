//! convert's zero detection at the head of a data extent that starts inside a block: a
//! zero head up to the first block boundary is left sparse as qemu-img leaves it (its
//! leading zero run is zero whatever its length), a head with data is written.

use diskimg_testutil::{qemu_compare, qemu_create, qemu_img_ok, qemu_io, qemu_map_json, tempdir};

use crate::{diskimg_ok, s};

/// A map without host offsets (the targets' allocators may differ).
fn layout(map: &serde_json::Value) -> Vec<(u64, u64, bool, bool)> {
    map.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap();
            (
                n("start"),
                n("length"),
                e["data"] == true,
                e["zero"] == true,
            )
        })
        .collect()
}

/// Sources in qcow2 with 512-byte clusters, so a data extent starts mid-4KiB.
#[test]
fn misaligned_zero_head_stays_sparse_like_qemu() {
    let dir = tempdir();
    let layouts: &[&[&str]] = &[
        // zero head [64.5k, 68k), data in the next block
        &["write -P 0 66048 3584", "write -P 1 69632 4096"],
        // zero head reaching an 8 KiB boundary, then data
        &["write -P 0 66048 7680", "write -P 1 73728 4096"],
        // data in the head block after zero sectors: written (the block is data)
        &[
            "write -P 0 66048 1024",
            "write -P 1 67072 512",
            "write -P 1 69632 4096",
        ],
        // zero head, data, zero tail in one extent
        &[
            "write -P 0 66048 3584",
            "write -P 1 69632 4096",
            "write -P 0 73728 1536",
        ],
    ];
    for (i, cmds) in layouts.iter().enumerate() {
        let src = dir.path().join("src.qcow2");
        qemu_create(&src, "qcow2", "cluster_size=512", Some("128K"));
        qemu_io(&src, "qcow2", cmds);
        for sparse in ["4k", "8k"] {
            for (fmt, opts) in [
                ("raw", ""),
                ("qcow2", "cluster_size=4096"),
                ("qcow2", "cluster_size=512"),
            ] {
                let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
                let mut args = vec!["convert", "-f", "qcow2", "-O", fmt, "-S", sparse];
                if !opts.is_empty() {
                    args.extend(["-o", opts]);
                }
                let mine = [args.as_slice(), &[s(&src), s(&ours)]].concat();
                let qemu = [args.as_slice(), &[s(&src), s(&theirs)]].concat();
                diskimg_ok(&mine);
                qemu_img_ok(&qemu);
                let what = format!("layout {i} -S {sparse} {fmt} {opts}");
                assert!(qemu_compare(&src, "qcow2", &ours, fmt), "{what}");
                let (mo, mq) = (qemu_map_json(&ours, fmt), qemu_map_json(&theirs, fmt));
                assert_eq!(layout(&mo), layout(&mq), "{what}: {mo} vs {mq}");
            }
        }
    }
}
