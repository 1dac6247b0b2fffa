//! The qemu sample images: sizes and content as qemu reads them.

use std::io::Read;
use std::sync::Arc;

use diskimg_blockio::{Driver, ExtentKind, FileStorage, OpenOptions, OptionList, Storage, map_all};
use diskimg_testutil::{corpus_file, qemu_img_ok, qemu_map_json, tempdir};

use crate::{open, qemu_size};

/// Compares our reading of `p` with qemu's, chunk by chunk (no whole-disk buffers).
fn assert_reads_like_qemu(p: &std::path::Path) {
    let dir = tempdir();
    let raw = dir.path().join("out.raw");
    qemu_img_ok(&[
        "convert",
        "-U",
        "-f",
        "vpc",
        "-O",
        "raw",
        p.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let dev = open(p, true);
    let size = dev.virtual_size();
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), size);
    let mut f = std::fs::File::open(&raw).unwrap();
    // Only ranges we map as data can differ from zero; check them and the holes' map.
    let mut theirs = vec![0u8; 4 << 20];
    let mut ours = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(4 << 20) as usize;
        f.read_exact(&mut theirs[..n]).unwrap();
        dev.read_at(&mut ours[..n], off).unwrap();
        assert!(
            ours[..n] == theirs[..n],
            "content differs in chunk at {off}"
        );
        off += n as u64;
    }
}

/// For huge sparse samples: map agrees with qemu and the data extents read the same.
fn assert_map_like_qemu(p: &std::path::Path) {
    let dev = open(p, true);
    let size = dev.virtual_size();
    let ours = map_all(dev.as_ref(), 0, size).unwrap();
    let theirs = qemu_map_json(p, "vpc");
    let theirs = theirs.as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (e, t) in ours.iter().zip(theirs) {
        assert_eq!(e.offset, t["start"].as_u64().unwrap());
        assert_eq!(e.len, t["length"].as_u64().unwrap());
        assert_eq!(
            matches!(e.kind, ExtentKind::Data { .. }),
            t["data"].as_bool().unwrap()
        );
    }
}

#[test]
fn virtual_pc_and_hyper_v_sizes() {
    let dir = tempdir();
    for (name, want) in [
        ("virtualpc-dynamic.vhd", 136_363_130_880u64),
        ("hyperv2012r2-dynamic.vhd", 136_365_211_648),
    ] {
        let p = corpus_file(name, dir.path());
        assert_eq!(qemu_size(&p), want);
        assert_eq!(open(&p, true).virtual_size(), want, "{name}");
        let r = open(&p, true).check(Default::default()).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{name}: {r:?}");
        assert_map_like_qemu(&p);
    }
}

#[test]
fn force_size_calc_overrides() {
    let dir = tempdir();
    let p = corpus_file("virtualpc-dynamic.vhd", dir.path());
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&p, true).unwrap());
    let mut o = OpenOptions::new().read_only(true);
    o.driver_options = OptionList::parse("force_size_calc=current_size").unwrap();
    let d = diskimg_vhd::DRIVER.open(s.clone(), &o).unwrap();
    let q = qemu_img_ok(&[
        "info",
        "-U",
        "--output=json",
        "--image-opts",
        &format!(
            "driver=vpc,force_size_calc=current_size,file.filename={}",
            p.display()
        ),
    ]);
    let q: serde_json::Value = serde_json::from_str(&q).unwrap();
    assert_eq!(d.virtual_size(), q["virtual-size"].as_u64().unwrap());
    assert_eq!(d.virtual_size(), 136_365_211_648);
    // iotest 146: chs on the Hyper-V image gives the geometry size; on the Disk2vhd
    // image (maximal geometry) current_size still wins.
    for (name, calc) in [
        ("hyperv2012r2-dynamic.vhd", "chs"),
        ("d2v-zerofilled.vhd", "chs"),
    ] {
        let p = corpus_file(name, dir.path());
        let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&p, true).unwrap());
        let mut o = OpenOptions::new().read_only(true);
        o.driver_options = OptionList::parse(&format!("force_size_calc={calc}")).unwrap();
        let q = qemu_img_ok(&[
            "info",
            "-U",
            "--output=json",
            "--image-opts",
            &format!(
                "driver=vpc,force_size_calc={calc},file.filename={}",
                p.display()
            ),
        ]);
        let q: serde_json::Value = serde_json::from_str(&q).unwrap();
        let ours = diskimg_vhd::DRIVER.open(s, &o).unwrap().virtual_size();
        assert_eq!(ours, q["virtual-size"].as_u64().unwrap(), "{name} {calc}");
    }
    o.driver_options = OptionList::parse("force_size_calc=bogus").unwrap();
    assert!(diskimg_vhd::DRIVER.open(s, &o).is_err());
}

#[test]
fn disk2vhd_reads_like_qemu() {
    let dir = tempdir();
    let p = corpus_file("d2v-zerofilled.vhd", dir.path());
    assert_eq!(open(&p, true).virtual_size(), qemu_size(&p));
    assert_eq!(qemu_size(&p), 263_454_720);
    assert_reads_like_qemu(&p);
    assert_map_like_qemu(&p);
    let r = open(&p, true).check(Default::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
}

#[test]
fn afl5_fails_cleanly() {
    let dir = tempdir();
    let p = corpus_file("afl5.img", dir.path());
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&p, true).unwrap());
    let err = diskimg_vhd::DRIVER
        .open(s, &OpenOptions::new().read_only(true))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Max Table Entries too large (1073741825)"),
        "{err}"
    );
    let q = diskimg_testutil::qemu_img(&["info", "-f", "vpc", p.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&q.stderr).contains(&err),
        "qemu says it differently"
    );
}
