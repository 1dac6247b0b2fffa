//! The same random workload applied by us and by qemu-io to copies gives identical images.

use diskimg_blockio::ZeroFlags;
use diskimg_testutil::{
    assert_qemu_check_clean, qemu_compare, qemu_create, qemu_io, qemu_read_raw, read_all, tempdir,
};

use crate::common::open;

fn ops(seed: u64, size: u64, n: usize) -> Vec<(u8, u64, u64, u8)> {
    let r = diskimg_testutil::pattern(seed, n * 24);
    (0..n)
        .map(|i| {
            let x = u64::from_le_bytes(r[i * 24..i * 24 + 8].try_into().unwrap());
            let y = u64::from_le_bytes(r[i * 24 + 8..i * 24 + 16].try_into().unwrap());
            let kind = (r[i * 24 + 16] % 4) as u8;
            let unaligned = r[i * 24 + 17].is_multiple_of(2);
            let (off, len) = if unaligned {
                let off = x % size;
                (off, 1 + y % (200_000).min(size - off))
            } else {
                let off = (x % (size / 512)) * 512;
                (off, 512 * (1 + y % 300).min((size - off) / 512))
            };
            (kind, off, len, r[i * 24 + 18] | 1)
        })
        .collect()
}

#[test]
fn workloads_match_qemu_io() {
    for (sub, seed) in [
        ("monolithicSparse", 1u64),
        ("monolithicFlat", 2),
        ("twoGbMaxExtentSparse", 3),
        ("monolithicSparse", 4),
    ] {
        let dir = tempdir();
        let a = dir.path().join("a.vmdk");
        let b = dir.path().join("b.vmdk");
        let size = 6u64 << 20;
        let extra = if seed == 4 { ",zeroed_grain=on" } else { "" };
        qemu_create(
            &a,
            "vmdk",
            &format!("subformat={sub}{extra}"),
            Some(&size.to_string()),
        );
        qemu_create(
            &b,
            "vmdk",
            &format!("subformat={sub}{extra}"),
            Some(&size.to_string()),
        );
        let dev = open(&a, false).unwrap();
        let mut cmds = Vec::new();
        for (kind, off, len, byte) in ops(seed, size, 40) {
            match kind {
                0 | 1 => {
                    dev.write_at(&vec![byte; len as usize], off).unwrap();
                    cmds.push(format!("write -P {byte} {off} {len}"));
                }
                2 => {
                    dev.write_zeroes(off, len, ZeroFlags::default()).unwrap();
                    cmds.push(format!("write -z {off} {len}"));
                }
                _ => {
                    dev.discard(off, len).unwrap();
                    cmds.push(format!("discard {off} {len}"));
                }
            }
        }
        dev.flush().unwrap();
        let ours = read_all(dev.as_ref());
        drop(dev);
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&b, "vmdk", &refs);
        assert_eq!(ours, qemu_read_raw(&b, "vmdk"), "{sub}");
        assert!(qemu_compare(&a, "vmdk", &b, "vmdk"), "{sub}");
        if sub.contains("Sparse") {
            assert_qemu_check_clean(&a, "vmdk");
        }
    }
}

#[test]
fn concurrent_writers_share_one_device() {
    let dir = tempdir();
    let img = dir.path().join("t.vmdk");
    crate::common::create(&img, 4 << 20, "").unwrap();
    let dev = open(&img, false).unwrap();
    // Four threads write interleaved 4 KiB chunks, so they race on the same grains.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let dev = dev.clone();
            s.spawn(move || {
                for i in 0..256u64 {
                    if i % 4 == t {
                        dev.write_at(&[t as u8 + 1; 4096], i * 4096 + 8192).unwrap();
                    }
                }
            });
        }
    });
    dev.flush().unwrap();
    let all = read_all(dev.as_ref());
    for i in 0..256usize {
        let off = i * 4096 + 8192;
        assert!(
            all[off..off + 4096].iter().all(|&b| b == (i % 4) as u8 + 1),
            "chunk {i}"
        );
    }
    drop(dev);
    assert_qemu_check_clean(&img, "vmdk");
    assert_eq!(all, qemu_read_raw(&img, "vmdk"));
}
