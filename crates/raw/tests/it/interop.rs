//! Raw images against qemu-img/qemu-io, both ways.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, FileStorage, OpenOptions, OptionList, Storage, ZeroFlags,
    map_chain,
};
use diskimg_testutil::{
    pattern, qemu_compare, qemu_img_ok, qemu_io, qemu_map_json, read_all, tempdir,
};

fn open(path: &std::path::Path, ro: bool) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, ro).unwrap());
    diskimg_raw::DRIVER
        .open(s, &OpenOptions::new().read_only(ro))
        .unwrap()
}

#[test]
fn qemu_writes_we_read() {
    let dir = tempdir();
    let p = dir.path().join("q.raw");
    qemu_img_ok(&["create", "-f", "raw", p.to_str().unwrap(), "8M"]);
    qemu_io(
        &p,
        "raw",
        &[
            "write -P 0xab 0 64k",
            "write -P 0x11 1M 4k",
            "write -z 1M 512",
        ],
    );
    let dev = open(&p, true);
    let data = read_all(dev.as_ref());
    assert_eq!(data, std::fs::read(&p).unwrap());
    assert!(data[..65536].iter().all(|&b| b == 0xab));
    assert!(data[(1 << 20)..(1 << 20) + 512].iter().all(|&b| b == 0));
    assert!(
        data[(1 << 20) + 512..(1 << 20) + 4096]
            .iter()
            .all(|&b| b == 0x11)
    );
}

#[test]
fn we_write_qemu_reads() {
    let dir = tempdir();
    let p = dir.path().join("w.raw");
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(&p).unwrap());
    let mut req = CreateRequest::new(4 << 20, OptionList::new());
    diskimg_raw::DRIVER.create(s.clone(), &mut req).unwrap();
    let dev = diskimg_raw::DRIVER.open(s, &OpenOptions::new()).unwrap();
    let buf = pattern(1, 100_000);
    dev.write_at(&buf, 12345).unwrap();
    dev.write_zeroes(20000, 3000, ZeroFlags::default()).unwrap();
    dev.flush().unwrap();
    // Apply the same operations with qemu-io to a qemu-made image and compare.
    let q = dir.path().join("q.raw");
    qemu_img_ok(&["create", "-f", "raw", q.to_str().unwrap(), "4M"]);
    let qdev = open(&q, false);
    qdev.write_at(&buf, 12345).unwrap();
    drop(qdev);
    qemu_io(&q, "raw", &["write -z 20000 3000"]);
    assert!(qemu_compare(&p, "raw", &q, "raw"));
    let content = std::fs::read(&p).unwrap();
    assert_eq!(&content[12345..20000], &buf[..20000 - 12345]);
    assert!(content[20000..23000].iter().all(|&b| b == 0));
}

#[test]
fn create_preallocation_modes_match_qemu_sizes() {
    let dir = tempdir();
    for mode in ["off", "falloc", "full"] {
        let ours = dir.path().join(format!("o-{mode}.raw"));
        let theirs = dir.path().join(format!("t-{mode}.raw"));
        let s: Arc<dyn Storage> = Arc::new(FileStorage::create(&ours).unwrap());
        let mut req = CreateRequest::new(
            3 << 20,
            OptionList::parse(&format!("preallocation={mode}")).unwrap(),
        );
        diskimg_raw::DRIVER.create(s, &mut req).unwrap();
        assert!(req.options.is_empty());
        qemu_img_ok(&[
            "create",
            "-f",
            "raw",
            "-o",
            &format!("preallocation={mode}"),
            theirs.to_str().unwrap(),
            "3M",
        ]);
        let (mo, mt) = (
            std::fs::metadata(&ours).unwrap(),
            std::fs::metadata(&theirs).unwrap(),
        );
        assert_eq!(mo.len(), mt.len(), "{mode}");
        use std::os::unix::fs::MetadataExt;
        if mode == "off" {
            // Only the first block, which qemu writes too (for alignment probing).
            assert_eq!(mo.blocks(), mt.blocks(), "sparse create allocates as qemu");
            assert!(mo.blocks() * 512 <= 4096, "{}", mo.blocks());
        } else {
            assert!(
                mo.blocks() * 512 >= 3 << 20,
                "{mode} allocates the whole file"
            );
        }
    }
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(dir.path().join("m")).unwrap());
    let mut req = CreateRequest::new(
        1 << 20,
        OptionList::parse("preallocation=metadata").unwrap(),
    );
    assert!(diskimg_raw::DRIVER.create(s, &mut req).is_err());
}

#[test]
fn map_agrees_with_qemu_img_map() {
    let dir = tempdir();
    let p = dir.path().join("m.raw");
    qemu_img_ok(&["create", "-f", "raw", p.to_str().unwrap(), "16M"]);
    qemu_io(
        &p,
        "raw",
        &["write -P 1 0 1M", "write -P 2 5M 64k", "write -P 3 15M 1M"],
    );
    let q = qemu_map_json(&p, "raw");
    let dev = open(&p, true);
    let ours = map_chain(dev.as_ref(), 0, dev.virtual_size()).unwrap();
    let q = q.as_array().unwrap();
    assert_eq!(q.len(), ours.len(), "{q:?} vs {ours:?}");
    for (a, b) in q.iter().zip(&ours) {
        assert_eq!(a["start"].as_u64().unwrap(), b.start);
        assert_eq!(a["length"].as_u64().unwrap(), b.length);
        assert_eq!(a["data"].as_bool().unwrap(), b.data);
        assert_eq!(a["zero"].as_bool().unwrap(), b.zero);
        assert_eq!(a["present"].as_bool().unwrap(), b.present);
        assert_eq!(a["offset"].as_u64(), b.offset);
        assert_eq!(a["depth"].as_u64().unwrap(), u64::from(b.depth));
    }
    assert!(ours.iter().any(|e| e.zero));
}
