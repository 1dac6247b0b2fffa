//! Internal snapshots: ours read by qemu, qemu's handled by us; create, delete, apply.

use diskimg_testutil::{
    assert_qemu_check_clean, qemu_compare, qemu_img_ok, qemu_io, qemu_read_raw, read_all, tempdir,
};

use crate::write::{qemu_create, run_both, workload};
use crate::{open, qemu_snapshot_raw};

#[test]
fn writes_after_internal_snapshot_copy_shared_clusters() {
    let dir = tempdir();
    let d = dir.path();
    for (i, o) in ["", "extended_l2=on", "compat=0.10,cluster_size=4k"]
        .iter()
        .enumerate()
    {
        let ours = d.join(format!("s{i}.qcow2"));
        let theirs = d.join(format!("t{i}.qcow2"));
        for p in [&ours, &theirs] {
            qemu_create(p, o, "4M");
            qemu_io(
                p,
                "qcow2",
                &[
                    "write -P 0x10 0 1M",
                    "write -c -P 0x11 2M 64k",
                    "write -z 3M 64k",
                ],
            );
            qemu_img_ok(&["snapshot", "-c", "snap", &p.to_string_lossy()]);
        }
        let before = qemu_read_raw(&ours, "qcow2");
        run_both(&ours, &theirs, &workload(), None);
        assert_eq!(
            qemu_snapshot_raw(&ours, "snapshot.name=snap"),
            before,
            "snapshot changed ({o})"
        );
    }
}

#[test]
fn create_and_delete_snapshots_like_qemu_img_snapshot() {
    let dir = tempdir();
    for (i, o) in [
        "",
        "compat=0.10,cluster_size=4k",
        "extended_l2=on",
        "refcount_bits=8,cluster_size=1k",
    ]
    .iter()
    .enumerate()
    {
        let p = dir.path().join(format!("sn{i}.qcow2"));
        qemu_create(&p, o, "2M");
        qemu_io(
            &p,
            "qcow2",
            &[
                "write -P 1 0 300k",
                "write -c -P 2 1M 64k",
                "write -z 1500k 64k",
            ],
        );
        let first = qemu_read_raw(&p, "qcow2");
        let dev = open(&p, false);
        let q2 = dev
            .as_any()
            .downcast_ref::<diskimg_qcow2::Qcow2Device>()
            .unwrap();
        assert_eq!(q2.create_snapshot("one").unwrap(), "1");
        // Duplicate names are allowed as in qemu (tested by the CLI against qemu-img).
        dev.write_at(&[3u8; 100_000], 50_000).unwrap();
        dev.discard(0, 64 << 10).unwrap();
        let second = read_all(dev.as_ref());
        assert_eq!(q2.create_snapshot("two").unwrap(), "2");
        dev.write_at(&[4u8; 70_000], 1_000_000).unwrap();
        let now = read_all(dev.as_ref());
        assert_eq!(read_all(q2.open_snapshot("one").unwrap().as_ref()), first);
        drop(dev);
        assert_qemu_check_clean(&p, "qcow2");
        let list = qemu_img_ok(&["snapshot", "-l", &p.to_string_lossy()]);
        assert!(list.contains("one") && list.contains("two"), "{list}");
        assert_eq!(qemu_snapshot_raw(&p, "snapshot.name=one"), first, "{o}");
        assert_eq!(qemu_snapshot_raw(&p, "snapshot.id=2"), second, "{o}");
        assert_eq!(qemu_read_raw(&p, "qcow2"), now);
        // Delete one of ours, then let qemu delete the other; both stay consistent.
        let dev = open(&p, false);
        let q2 = dev
            .as_any()
            .downcast_ref::<diskimg_qcow2::Qcow2Device>()
            .unwrap();
        q2.delete_snapshot("one").unwrap();
        assert!(q2.delete_snapshot("one").is_err());
        assert_eq!(q2.snapshots().len(), 1);
        drop(dev);
        assert_qemu_check_clean(&p, "qcow2");
        assert_eq!(qemu_snapshot_raw(&p, "snapshot.name=two"), second);
        qemu_img_ok(&["snapshot", "-d", "two", &p.to_string_lossy()]);
        assert_qemu_check_clean(&p, "qcow2");
        assert_eq!(qemu_read_raw(&p, "qcow2"), now);
        // And a snapshot qemu made, deleted by us.
        qemu_img_ok(&["snapshot", "-c", "q", &p.to_string_lossy()]);
        qemu_io(&p, "qcow2", &["write -P 5 0 64k"]);
        let dev = open(&p, false);
        let q2 = dev
            .as_any()
            .downcast_ref::<diskimg_qcow2::Qcow2Device>()
            .unwrap();
        q2.delete_snapshot("q").unwrap();
        drop(dev);
        assert_qemu_check_clean(&p, "qcow2");
    }
}

#[test]
fn apply_snapshot_like_qemu_img_snapshot_a() {
    let dir = tempdir();
    for (i, o) in ["", "compat=0.10,cluster_size=4k", "extended_l2=on"]
        .iter()
        .enumerate()
    {
        let ours = dir.path().join(format!("ap{i}.qcow2"));
        let theirs = dir.path().join(format!("at{i}.qcow2"));
        for p in [&ours, &theirs] {
            qemu_create(p, o, "2M");
            qemu_io(p, "qcow2", &["write -P 1 0 300k", "write -c -P 2 1M 64k"]);
            qemu_img_ok(&["snapshot", "-c", "base", &p.to_string_lossy()]);
            qemu_io(
                p,
                "qcow2",
                &[
                    "write -P 3 100k 300k",
                    "discard 1M 64k",
                    "write -P 4 1500k 4k",
                ],
            );
        }
        let dev = open(&ours, false);
        let q2 = dev
            .as_any()
            .downcast_ref::<diskimg_qcow2::Qcow2Device>()
            .unwrap();
        q2.apply_snapshot("base").unwrap();
        assert!(q2.apply_snapshot("nope").is_err());
        let after = read_all(dev.as_ref());
        dev.write_at(&[9u8; 5000], 2000).unwrap();
        drop(dev);
        qemu_img_ok(&["snapshot", "-a", "base", &theirs.to_string_lossy()]);
        assert_eq!(after, qemu_read_raw(&theirs, "qcow2"), "{o}");
        qemu_io(&theirs, "qcow2", &["write -P 9 2000 5000"]);
        assert_qemu_check_clean(&ours, "qcow2");
        assert!(qemu_compare(&ours, "qcow2", &theirs, "qcow2"), "{o}");
        assert_eq!(
            qemu_snapshot_raw(&ours, "snapshot.name=base"),
            qemu_snapshot_raw(&theirs, "snapshot.name=base")
        );
    }
}

/// The data runs of the file at `p` (`SEEK_DATA` / `SEEK_HOLE`).
fn data_runs(p: &std::path::Path) -> Vec<(u64, u64)> {
    use diskimg_blockio::Storage;
    let f = diskimg_blockio::FileStorage::open(p, true).unwrap();
    let mut runs = Vec::new();
    let mut off = 0;
    while let Some(d) = f.next_data(off).unwrap() {
        let h = f.next_hole(d).unwrap();
        runs.push((d, h));
        off = h;
    }
    runs
}

/// `snapshot -d` frees the clusters only the snapshot used and discards them in the
/// file, as qemu (`pass-discard-snapshot`): the same image, written out fully
/// allocated, has the same holes after qemu-img's delete and ours (the snapshot's L2
/// tables, data clusters, L1 table and the old snapshot table), and the same bytes.
#[test]
fn delete_snapshot_discards_freed_clusters_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    for (o, del) in [
        ("cluster_size=64k", "s1"),
        ("cluster_size=64k", "s2"),
        ("cluster_size=16k,extended_l2=on", "s1"),
        ("compat=0.10,cluster_size=4k", "s2"),
    ] {
        let src = d.join("src.qcow2");
        qemu_create(&src, o, "4M");
        qemu_io(&src, "qcow2", &["write -P 1 0 1M", "write -c -P 2 2M 128k"]);
        qemu_img_ok(&["snapshot", "-c", "s1", &src.to_string_lossy()]);
        qemu_io(
            &src,
            "qcow2",
            &[
                "write -P 3 0 512k",
                "write -P 4 2M 64k",
                "write -c -P 6 3M 64k",
            ],
        );
        qemu_img_ok(&["snapshot", "-c", "s2", &src.to_string_lossy()]);
        qemu_io(
            &src,
            "qcow2",
            &["write -P 5 256k 512k", "write -P 7 3M 64k"],
        );
        let bytes = std::fs::read(&src).unwrap();
        let (theirs, ours) = (d.join("t.qcow2"), d.join("o.qcow2"));
        std::fs::write(&theirs, &bytes).unwrap();
        std::fs::write(&ours, &bytes).unwrap();
        assert_eq!(data_runs(&ours), vec![(0, bytes.len() as u64)], "{o}");
        qemu_img_ok(&["snapshot", "-d", del, &theirs.to_string_lossy()]);
        let dev = open(&ours, false);
        let q2 = dev.as_any().downcast_ref::<diskimg_qcow2::Qcow2Device>();
        q2.unwrap().delete_snapshot(del).unwrap();
        dev.close().unwrap();
        let runs = data_runs(&theirs);
        assert!(runs.len() > 1, "{o}: qemu punched nothing: {runs:?}");
        assert_eq!(data_runs(&ours), runs, "{o} -d {del}");
        assert_qemu_check_clean(&ours, "qcow2");
        assert!(
            qemu_compare(&ours, "qcow2", &theirs, "qcow2"),
            "{o}: contents"
        );
        let (t, u) = (
            std::fs::read(&theirs).unwrap(),
            std::fs::read(&ours).unwrap(),
        );
        assert_eq!(t.len(), u.len(), "{o}: file length");
    }
}
