//! Zero writes over clusters an internal snapshot shares, as qemu's `zero_in_l2_slice`:
//! without unmap the entry keeps its host cluster (still shared, no COPIED flag) and
//! gains the zero flag; with unmap, and for compressed clusters, the reference is
//! dropped. Twin images, one changed by qemu-io and one by us, must be byte-identical,
//! check clean, keep the snapshot's contents, and stay identical after the snapshot is
//! deleted by each tool.

use diskimg_testutil::{qemu_create, qemu_img_ok, qemu_io, tempdir};

use crate::image_end::apply;
use crate::{open, qemu_snapshot_raw};

const ZERO_WRITES: &[&str] = &[
    "write -z 0 64k",
    "write -z 100k 200k",
    "write -z 2M 64k",
    "write -z -u 512k 64k",
    "write -z 700k 4k",
];

#[test]
fn zero_writes_on_snapshot_shared_clusters_as_qemu() {
    let dir = tempdir();
    let (q, d) = (dir.path().join("q.qcow2"), dir.path().join("d.qcow2"));
    let qs = q.to_string_lossy().into_owned();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &qs, "4M"]);
    qemu_io(&q, "qcow2", &["write -P 1 0 1M", "write -c -P 2 2M 64k"]);
    qemu_img_ok(&["snapshot", "-c", "s1", &qs]);
    std::fs::copy(&q, &d).unwrap();
    let before = qemu_snapshot_raw(&q, "snapshot.name=s1");
    qemu_io(&q, "qcow2", ZERO_WRITES);
    let dev = open(&d, false);
    for c in ZERO_WRITES {
        apply(dev.as_ref(), c);
    }
    dev.close().unwrap();
    drop(dev);
    let (qb, db) = (std::fs::read(&q).unwrap(), std::fs::read(&d).unwrap());
    assert!(db == qb, "the images differ after the zero writes");
    diskimg_testutil::assert_qemu_check_clean(&d, "qcow2");
    assert!(
        qemu_snapshot_raw(&d, "snapshot.name=s1") == before,
        "snapshot changed"
    );
    // The snapshot's references go: the zeroed clusters it shared become COPIED again.
    qemu_img_ok(&["snapshot", "-d", "s1", &qs]);
    let dev = open(&d, false);
    let snaps = dev.as_snapshots().expect("qcow2 snapshots");
    snaps.delete("s1").unwrap();
    dev.close().unwrap();
    drop(dev);
    diskimg_testutil::assert_qemu_check_clean(&d, "qcow2");
    let entries = |p: &std::path::Path| {
        let b = std::fs::read(p).unwrap();
        let be = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
        let l2 = (be(be(40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
        (0..64).map(|i| be(l2 + 8 * i)).collect::<Vec<_>>()
    };
    assert_eq!(
        entries(&d),
        entries(&q),
        "L2 entries after the snapshot is deleted"
    );
}

/// v2 has no zero flag: a zero write over part of an unallocated cluster (no backing
/// file) grows to the whole cluster, which qemu zeroes by discarding it — no data
/// cluster is allocated (we allocated one and wrote zeroes). qemu also allocates the
/// L2 table the discard looks into; we do not (docs/formats/qcow2.md, differences).
#[test]
fn v2_partial_zero_writes_allocate_no_data() {
    let dir = tempdir();
    let (q, d) = (dir.path().join("q.qcow2"), dir.path().join("d.qcow2"));
    qemu_create(&q, "qcow2", "compat=0.10", Some("64M"));
    std::fs::copy(&q, &d).unwrap();
    let cmds = [
        "write -z 5M 4k",
        "write -z 100k 8k",
        "write -P 1 9M 64k",
        "write -z 9M 4k",
    ];
    qemu_io(&q, "qcow2", &cmds);
    let dev = open(&d, false);
    for c in cmds {
        apply(dev.as_ref(), c);
    }
    dev.close().unwrap();
    drop(dev);
    diskimg_testutil::assert_qemu_check_clean(&d, "qcow2");
    assert!(diskimg_testutil::qemu_compare(&q, "qcow2", &d, "qcow2"));
    let data = |p: &std::path::Path| {
        let m = diskimg_testutil::qemu_map_json(p, "qcow2");
        let v: Vec<(u64, u64)> = m
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect();
        v
    };
    assert_eq!(data(&d), data(&q), "data extents");
    assert_eq!(data(&d), [(9 << 20, 64 << 10)]);
}
