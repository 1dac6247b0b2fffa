//! The same workload applied by us and by qemu-io to copies gives identical images.

use diskimg_blockio::ZeroFlags;
use diskimg_testutil::{
    Model, Rng, assert_qemu_check_clean, qemu_compare, qemu_io, read_all, tempdir,
};

use crate::{create, open};

#[test]
fn random_workload_matches_qemu_io() {
    let dir = tempdir();
    let size: u64 = 12 << 20;
    for (seed, opts) in [(7u64, ""), (11, "static=on"), (23, "")] {
        let ours = dir.path().join("ours.vdi");
        let theirs = dir.path().join("theirs.vdi");
        create(&ours, size, opts);
        std::fs::copy(&ours, &theirs).unwrap();
        let dev = open(&ours, false);
        let mut model = Model::zeroed(size as usize);
        let mut rng = Rng(seed * 0x9e37_79b9 + 1);
        let mut cmds = Vec::new();
        for i in 0..40 {
            let off = if rng.below(3) == 0 {
                rng.below(size / 512) * 512
            } else {
                rng.below(size)
            };
            let max = (size - off).min(3 << 20);
            let cap = if rng.below(4) == 0 { max } else { 70_000 };
            let len = 1 + rng.below(max.min(cap));
            match rng.below(6) {
                0 => {
                    dev.write_zeroes(
                        off,
                        len,
                        ZeroFlags {
                            may_unmap: rng.below(2) == 0,
                        },
                    )
                    .unwrap();
                    model.zero(off as usize, len as usize);
                    cmds.push(format!("write -z {off} {len}"));
                }
                1 => {
                    dev.discard(off, len).unwrap();
                    cmds.push(format!("discard {off} {len}"));
                }
                _ => {
                    let pat = (i * 37 % 255 + 1) as u8;
                    let data = vec![pat; len as usize];
                    dev.write_at(&data, off).unwrap();
                    model.write(off as usize, &data);
                    cmds.push(format!("write -P {pat} {off} {len}"));
                }
            }
            if i % 13 == 0 {
                dev.flush().unwrap();
            }
        }
        dev.flush().unwrap();
        assert_eq!(read_all(dev.as_ref()), model.bytes);
        drop(dev);
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        for batch in refs.chunks(20) {
            qemu_io(&theirs, "vdi", batch);
        }
        assert_qemu_check_clean(&ours, "vdi");
        assert!(qemu_compare(&ours, "vdi", &theirs, "vdi"), "seed {seed}");
        let dev = open(&ours, true);
        assert_eq!(read_all(dev.as_ref()), model.bytes);
    }
}

#[test]
fn qemu_writes_after_ours_and_back() {
    let dir = tempdir();
    let p = dir.path().join("x.vdi");
    create(&p, 4 << 20, "");
    let dev = open(&p, false);
    dev.write_at(&[1; 1000], 2 << 20).unwrap();
    dev.flush().unwrap();
    drop(dev);
    // qemu allocates the next block after ours.
    qemu_io(&p, "vdi", &["write -P 2 0 4k", "read -P 1 2M 1000"]);
    assert_qemu_check_clean(&p, "vdi");
    let dev = open(&p, false);
    dev.write_at(&[3; 512], 3 << 20).unwrap();
    dev.flush().unwrap();
    drop(dev);
    qemu_io(
        &p,
        "vdi",
        &[
            "read -P 2 0 4k",
            "read -P 1 2M 1000",
            "read -P 3 3M 512",
            "read -P 0 1M 1M",
        ],
    );
    assert_qemu_check_clean(&p, "vdi");
}

#[test]
fn concurrent_writers_allocate_distinct_blocks() {
    let dir = tempdir();
    let p = dir.path().join("mt.vdi");
    create(&p, 16 << 20, "");
    let dev = open(&p, false);
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let dev = dev.clone();
            s.spawn(move || {
                for i in 0..8u64 {
                    // Threads interleave within the same blocks too.
                    let off = i * (2 << 20) + u64::from(t) * 4096;
                    dev.write_at(&[t + 1; 4096], off.min((16 << 20) - 4096))
                        .unwrap();
                }
            });
        }
    });
    dev.flush().unwrap();
    let mut model = Model::zeroed(16 << 20);
    for t in 0..4u8 {
        for i in 0..8u64 {
            let off = (i * (2 << 20) + u64::from(t) * 4096).min((16 << 20) - 4096);
            model.write(off as usize, &[t + 1; 4096]);
        }
    }
    assert_eq!(read_all(dev.as_ref()), model.bytes);
    drop(dev);
    assert_qemu_check_clean(&p, "vdi");
    let raw = dir.path().join("m.raw");
    std::fs::write(&raw, &model.bytes).unwrap();
    assert!(qemu_compare(&p, "vdi", &raw, "raw"));
}
