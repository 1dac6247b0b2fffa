//! Encrypted images under faults: crash cuts, damaged LUKS headers, and a proptest model.

use super::*;

#[test]
fn crash_at_every_cut_of_an_encrypted_workload() {
    use diskimg_blockio::{FaultStorage, MemStorage};
    const SIZE: u64 = 1 << 20;
    let base: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = diskimg_blockio::CreateRequest::new(
        SIZE,
        diskimg_blockio::OptionList::parse(
            "cluster_size=4k,encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1",
        )
        .unwrap(),
    )
    .secrets(Secrets::new().with("sec0", SECRET));
    DRIVER.create(base.clone(), &mut req).unwrap();
    let mut initial = vec![0u8; base.len().unwrap() as usize];
    base.read_exact_at(&mut initial, 0).unwrap();
    let ops: [(u64, u64, u8); 7] = [
        (0, 8192, 7),
        (5000, 300, 8),
        (65536, 20000, 9),
        (4096, 8192, 0),
        (300_000, 100_000, 10),
        (700_001, 3, 11),
        (65536, 4096, 0),
    ];
    let apply = |dev: &dyn BlockDevice, m: &mut Model, (o, l, b): (u64, u64, u8)| {
        if b == 0 {
            dev.write_zeroes(o, l, ZeroFlags { may_unmap: true })?;
            m.zero(o as usize, l as usize);
        } else {
            dev.write_at(&vec![b; l as usize], o)?;
            m.write(o as usize, &vec![b; l as usize]);
        }
        dev.flush()
    };
    let count = {
        let fs = Arc::new(FaultStorage::new(initial.clone(), None));
        let dev = DRIVER.open(fs.clone(), &key_opts(false, SECRET)).unwrap();
        let mut m = Model::zeroed(SIZE as usize);
        for op in ops {
            apply(dev.as_ref(), &mut m, op).unwrap();
        }
        fs.ops()
    };
    let dir = tempdir();
    let path = dir.path().join("crash.qcow2");
    for cut in 0..count {
        let fs = Arc::new(FaultStorage::new(initial.clone(), Some(cut)));
        let dev = DRIVER.open(fs.clone(), &key_opts(false, SECRET)).unwrap();
        let mut m = Model::zeroed(SIZE as usize);
        let mut durable = m.clone();
        let mut pending = None;
        for op in ops {
            pending = Some(op);
            if apply(dev.as_ref(), &mut m, op).is_err() {
                break;
            }
            durable = m.clone();
            pending = None;
        }
        drop(dev);
        for (mode, img, dev) in crate::crash_images(&fs, cut, &key_opts(true, SECRET)) {
            crate::assert_cut_checks_clean(dev.as_ref(), &format!("cut {cut} {mode:?}"));
            let mut got = read_all(dev.as_ref());
            let mut want = durable.bytes.clone();
            if let Some((o, l, _)) = pending {
                let (s, e) = (
                    (o / 4096 * 4096) as usize,
                    ((o + l).div_ceil(4096) * 4096) as usize,
                );
                got[s..e].fill(0);
                want[s..e].fill(0);
            }
            assert!(got == want, "cut {cut} {mode:?}: flushed data lost");
            if cut % 7 == 0 {
                std::fs::write(&path, &img).unwrap();
                let v = qemu_check(&path);
                assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "cut {cut}: {v}");
            }
        }
    }
}

/// Damaged LUKS headers and key material: opens fail cleanly (or succeed), never panic.
#[test]
fn hostile_luks_headers_give_clean_errors() {
    let dir = tempdir();
    let p = dir.path().join("h.qcow2");
    qemu_create(
        &p,
        "encrypt.format=luks,encrypt.iter-time=1,cluster_size=4k",
        "1M",
    );
    qio(&p, &["write -P 0x3c 0 8k"]);
    let img = std::fs::read(&p).unwrap();
    let (off, _) = crypt_layout(&p).1.unwrap();
    let off = off as usize;
    // Skip the iteration counts (208+48*i+4 and 164..168): valid large values only cost time.
    let iter_field = |i: usize| {
        (164..168).contains(&i) || (i >= 208 && (i - 208) % 48 >= 4 && (i - 208) % 48 < 8)
    };
    let mut opened = 0;
    for i in (0..592).step_by(3).filter(|&i| !iter_field(i)) {
        let mut v = img.clone();
        v[off + i] ^= 0x80;
        let s: Arc<dyn Storage> = Arc::new(diskimg_blockio::MemStorage::from_vec(v));
        if let Ok(dev) = DRIVER.open(s, &key_opts(true, SECRET)) {
            opened += 1;
            let _ = read_all(dev.as_ref());
        }
    }
    assert!(opened > 0);
    // Header pointing the LUKS area beyond the file, and a missing extension.
    let mut v = img.clone();
    let ext_at = v
        .windows(4)
        .position(|w| w == [0x05, 0x37, 0xbe, 0x77])
        .unwrap();
    v[ext_at + 8..ext_at + 16].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let s: Arc<dyn Storage> = Arc::new(diskimg_blockio::MemStorage::from_vec(v));
    assert!(DRIVER.open(s, &key_opts(true, SECRET)).is_err());
    let mut v = img;
    v[ext_at..ext_at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    let s: Arc<dyn Storage> = Arc::new(diskimg_blockio::MemStorage::from_vec(v));
    assert!(DRIVER.open(s, &key_opts(true, SECRET)).is_err());
}

mod model {
    //! proptest: random operations on encrypted images against a `Model`, reopened
    //! (unlocked again) in between.
    use super::*;
    use diskimg_blockio::{CreateRequest, MemStorage, OptionList};
    use proptest::prelude::*;

    use crate::model::{Op, apply, op_in};

    const SIZE: u64 = 256 << 10;

    fn op() -> impl Strategy<Value = Op> {
        op_in(SIZE, 40_000)
    }

    fn run(options: &str, ops: &[Op]) {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let secrets = Secrets::new().with("sec0", SECRET);
        let mut req =
            CreateRequest::new(SIZE, OptionList::parse(options).unwrap()).secrets(secrets.clone());
        DRIVER.create(s.clone(), &mut req).unwrap();
        let open = || DRIVER.open(s.clone(), &key_opts(false, SECRET)).unwrap();
        let dev = apply(ops, SIZE, &open);
        assert_eq!(dev.check(Default::default()).unwrap().corruptions, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn luks_ops_match_model(ops in proptest::collection::vec(op(), 1..25)) {
            run("cluster_size=4k,encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv", &ops);
        }

        #[test]
        fn legacy_aes_ops_match_model(ops in proptest::collection::vec(op(), 1..25)) {
            run("cluster_size=4k,encrypt.format=aes,encrypt.key-secret=sec0", &ops);
        }
    }
}
