//! `check`: the same counts as `qemu-img check`, and repairs qemu then finds clean.

use diskimg_testutil::{assert_qemu_check_clean, qemu_io, qemu_read_raw, tempdir};

use crate::open;
use crate::write::qemu_create;

#[test]
fn check_counts_like_qemu_and_repairs() {
    use diskimg_blockio::RepairMode;
    let dir = tempdir();
    let p = dir.path().join("rep.qcow2");
    qemu_create(&p, "cluster_size=4k", "1M");
    qemu_io(&p, "qcow2", &["write -P 1 0 64k", "write -c -P 2 128k 4k"]);
    let img = std::fs::read(&p).unwrap();
    let rt = u64::from_be_bytes(img[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(img[rt..rt + 8].try_into().unwrap()) as usize;
    let mut bad = img.clone();
    // Cluster 20 (a data cluster) loses its refcount (corruption); cluster 5 gets one
    // reference too many (leak).
    for (c, v) in [(20usize, 0u16), (5, 2)] {
        assert_eq!(
            u16::from_be_bytes(bad[rb + 2 * c..rb + 2 * c + 2].try_into().unwrap()),
            1
        );
        bad[rb + 2 * c..rb + 2 * c + 2].copy_from_slice(&v.to_be_bytes());
    }
    std::fs::write(&p, &bad).unwrap();
    let (q, _) = diskimg_testutil::qemu_check_json(&p, "qcow2");
    let dev = open(&p, true);
    let r = dev.check(RepairMode::None).unwrap();
    drop(dev);
    assert_eq!(
        r.corruptions,
        q["corruptions"].as_u64().unwrap_or(0),
        "{q} {:?}",
        r.messages
    );
    assert_eq!(r.leaks, q["leaks"].as_u64().unwrap_or(0), "{q} {r:?}");
    assert_eq!(r.allocated_clusters, q["allocated-clusters"].as_u64());
    assert_eq!(r.compressed_clusters, q["compressed-clusters"].as_u64());
    assert_eq!(r.total_clusters, q["total-clusters"].as_u64());
    assert_eq!(r.fragmented_clusters, q["fragmented-clusters"].as_u64());
    assert_eq!(r.image_end_offset, q["image-end-offset"].as_u64());
    assert!(r.corruptions > 0 && r.leaks > 0, "{r:?}");
    let dev = open(&p, false);
    let fixed = dev.check(RepairMode::All).unwrap();
    // Refcounts are fixed first, which also makes the COPIED flags right again.
    assert!(fixed.corruptions_fixed >= 1 && fixed.corruptions_fixed == fixed.corruptions);
    assert_eq!(fixed.leaks_fixed, r.leaks);
    drop(dev);
    assert_qemu_check_clean(&p, "qcow2");
}

#[test]
fn check_repairs_copied_flags() {
    use diskimg_blockio::RepairMode;
    let dir = tempdir();
    let p = dir.path().join("cp.qcow2");
    qemu_create(&p, "", "1M");
    qemu_io(&p, "qcow2", &["write -P 1 0 64k"]);
    let mut img = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(img[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    img[l2] &= 0x7f; // clear COPIED on a cluster with refcount 1
    std::fs::write(&p, &img).unwrap();
    let (q, _) = diskimg_testutil::qemu_check_json(&p, "qcow2");
    let r = open(&p, true).check(RepairMode::None).unwrap();
    assert_eq!(r.corruptions, q["corruptions"].as_u64().unwrap());
    assert_eq!(r.corruptions, 1);
    let fixed = open(&p, false).check(RepairMode::All).unwrap();
    assert_eq!(fixed.corruptions_fixed, 1);
    assert_qemu_check_clean(&p, "qcow2");
    assert_eq!(qemu_read_raw(&p, "qcow2")[..65536], [1u8; 65536]);
}
