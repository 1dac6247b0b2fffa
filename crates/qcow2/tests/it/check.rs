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

/// `qemu-img check` (with `-r` as given) on a copy of `img` at `dir`: its findings
/// (stderr, without its own `qemu-img:` lines), the image after, and its exit code.
fn qemu_check_lines(dir: &std::path::Path, img: &[u8], r: &[&str]) -> (Vec<String>, Vec<u8>, i32) {
    let p = dir.join("q.qcow2");
    std::fs::write(&p, img).unwrap();
    let ps = p.to_string_lossy().into_owned();
    let mut args = vec!["check"];
    args.extend_from_slice(r);
    args.push(&ps);
    let out = diskimg_testutil::qemu_img(&args);
    let lines = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("qemu-img:"))
        .map(str::to_string)
        .collect();
    (
        lines,
        std::fs::read(&p).unwrap(),
        out.status.code().unwrap_or(-1),
    )
}

/// Crafted corruptions qemu's `check_refcounts_l1/_l2` and `check_refblocks` name: our
/// check finds the same things in the same words and order as `qemu-img check`, with
/// and without `-r leaks` / `-r all`, and a repair leaves the image qemu's leaves (same
/// `qemu-img check` verdict on both, same guest contents).
#[test]
fn crafted_corruptions_reported_and_repaired_as_qemu() {
    use diskimg_blockio::RepairMode;
    let dir = tempdir();
    let p = dir.path().join("src.qcow2");
    qemu_create(&p, "", "4M");
    let w = [
        "write -P 1 0 256k",
        "write -P 2 1M 64k",
        "write -c -P 3 2M 64k",
    ];
    qemu_io(&p, "qcow2", &w);
    let img = std::fs::read(&p).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let (l1, rt) = (be(&img, 40) as usize, be(&img, 48) as usize);
    let l2 = (be(&img, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let rb = be(&img, rt);
    let comp = (0..8192)
        .map(|i| l2 + 8 * i)
        .find(|&a| be(&img, a) >> 62 == 1)
        .unwrap();
    let outside = (img.len() as u64).div_ceil(65536) * 65536 + (50 << 16);
    // The last field: `-r all` does what qemu's does (else: it leaves a clean image where
    // qemu fails its rebuild on its own overlap check or after a corruption event).
    let cases: [(&str, usize, u64, bool); 8] = [
        ("L2 table on the refcount block", l1, rb | 1 << 63, true),
        ("misaligned L2 table", l1, be(&img, l1) + 512, true),
        ("L1 entry reserved bit", l1, be(&img, l1) | 2, true),
        ("L2 entry reserved bit", l2, be(&img, l2) | 4, true),
        (
            "compressed with COPIED",
            comp,
            be(&img, comp) | 1 << 63,
            true,
        ),
        ("reftable entry reserved bit", rt, rb | 1, false),
        ("refcount block outside the file", rt + 8, outside, true),
        // qemu's `-r all` fails its rebuild after the corruption event (EIO).
        ("misaligned refcount block", rt, rb + 512, false),
    ];
    let modes: [(&[&str], RepairMode); 3] = [
        (&[], RepairMode::None),
        (&["-r", "leaks"], RepairMode::Leaks),
        (&["-r", "all"], RepairMode::All),
    ];
    for (what, at, v, all_as_qemu) in cases {
        let mut bad = img.clone();
        bad[at..at + 8].copy_from_slice(&v.to_be_bytes());
        for (args, mode) in modes {
            if mode == RepairMode::All && !all_as_qemu {
                let u = dir.path().join("u.qcow2");
                std::fs::write(&u, &bad).unwrap();
                let r = open(&u, false).check(mode).unwrap();
                assert!(r.corruptions_fixed > 0, "{what}: {r:?}");
                assert_qemu_check_clean(&u, "qcow2");
                continue;
            }
            let (want, theirs, _) = qemu_check_lines(dir.path(), &bad, args);
            let u = dir.path().join("u.qcow2");
            std::fs::write(&u, &bad).unwrap();
            let dev = open(&u, mode == RepairMode::None);
            let r = dev.check(mode).unwrap();
            let mut got = r.messages.clone();
            // As qemu-img (and our CLI): an image something was fixed in is checked again.
            if r.leaks_fixed + r.corruptions_fixed > 0 {
                got.extend(dev.check(RepairMode::None).unwrap().messages);
            }
            dev.close().unwrap();
            assert_eq!(got, want, "{what} {args:?}");
            if mode == RepairMode::None {
                continue;
            }
            let t = dir.path().join("t.qcow2");
            std::fs::write(&t, &theirs).unwrap();
            let verdict = |f: &std::path::Path| {
                let (mut v, code) = diskimg_testutil::qemu_check_json(f, "qcow2");
                v.as_object_mut().unwrap().remove("filename");
                (v, code)
            };
            let after = verdict(&t);
            assert_eq!(
                after,
                verdict(&u),
                "{what} {args:?}: qemu-img check after the repairs"
            );
            // (An image left corrupt cannot be read through.)
            if after.0["corruptions"].as_u64() == Some(0) {
                assert!(
                    diskimg_testutil::qemu_compare(&t, "qcow2", &u, "qcow2"),
                    "{what} {args:?}: contents after the repairs"
                );
            }
        }
    }
}
