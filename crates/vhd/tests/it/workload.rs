//! The same random workload applied by us and by qemu-io to copies of one image gives
//! identical content. (qemu's vpc driver ignores discard; ours zeroes, so a discard here
//! is compared with qemu-io's `write -z`.)

use diskimg_blockio::ZeroFlags;
use diskimg_testutil::{qemu_compare, qemu_create, qemu_io, qemu_read_raw, tempdir};

use crate::open;

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn random_workload_matches_qemu_io() {
    let dir = tempdir();
    for (k, o) in ["subformat=dynamic", "subformat=fixed"].iter().enumerate() {
        let orig = dir.path().join("orig.vhd");
        qemu_create(&orig, "vpc", o, Some("10M"));
        let ours = dir.path().join("ours.vhd");
        let theirs = dir.path().join("theirs.vhd");
        std::fs::copy(&orig, &ours).unwrap();
        std::fs::copy(&orig, &theirs).unwrap();
        let dev = open(&ours, false);
        let size = dev.virtual_size();
        let mut seed = 0x1234_5678 + k as u64;
        let mut cmds = Vec::new();
        for i in 0..40 {
            let off = rng(&mut seed) % size;
            let len = (rng(&mut seed) % (300 << 10)).clamp(1, size - off);
            let byte = (i * 37 % 251 + 1) as u8;
            match rng(&mut seed) % 4 {
                0 => {
                    dev.write_zeroes(off, len, ZeroFlags::default()).unwrap();
                    cmds.push(format!("write -z {off} {len}"));
                }
                1 => {
                    dev.discard(off, len).unwrap();
                    cmds.push(format!("write -z {off} {len}"));
                }
                _ => {
                    dev.write_at(&vec![byte; len as usize], off).unwrap();
                    cmds.push(format!("write -P {byte} {off} {len}"));
                }
            }
        }
        dev.flush().unwrap();
        drop(dev);
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&theirs, "vpc", &refs);
        assert_eq!(
            qemu_read_raw(&ours, "vpc"),
            qemu_read_raw(&theirs, "vpc"),
            "{o}"
        );
        assert!(qemu_compare(&ours, "vpc", &theirs, "vpc"));
        let r = open(&ours, true).check(Default::default()).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{o}: {r:?}");
    }
}
