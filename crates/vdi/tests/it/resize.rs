//! Growing images (qemu-img cannot resize vdi); the result must stay valid for qemu.

use diskimg_blockio::{Preallocation, RepairMode};
use diskimg_testutil::{
    assert_qemu_check_clean, pattern, qemu_img, qemu_img_ok, qemu_info_json, qemu_io,
    qemu_read_raw, read_all, tempdir,
};

use crate::{create, open};

#[test]
fn qemu_cannot_resize_vdi() {
    let dir = tempdir();
    let p = dir.path().join("q.vdi");
    create(&p, 1 << 20, "");
    let out = qemu_img(&["resize", "-f", "vdi", &p.to_string_lossy(), "2M"]);
    assert!(!out.status.success());
}

#[test]
fn grow_within_and_beyond_map_room() {
    let dir = tempdir();
    // 3M: the map sector has room for 128 entries, so 100M fits without moving data;
    // 300M needs a second map sector and moves the first data block.
    for (opts, sizes) in [
        ("", [3u64 << 20, 100 << 20, 300 << 20]),
        ("static=on", [3 << 20, 5 << 20, 130 << 20]),
    ] {
        let p = dir.path().join("g.vdi");
        create(&p, sizes[0], opts);
        qemu_io(&p, "vdi", &["write -P 0x61 0 1M", "write -P 0x62 2M 4k"]);
        let mut expect = qemu_read_raw(&p, "vdi");
        for &new in &sizes[1..] {
            let dev = open(&p, false);
            let tail = pattern(new, 70_000);
            dev.resize(new, Preallocation::Off, false).unwrap();
            assert_eq!(dev.virtual_size(), new);
            expect.resize(new as usize, 0);
            dev.write_at(&tail, new - 70_000).unwrap();
            expect[(new - 70_000) as usize..].copy_from_slice(&tail);
            dev.flush().unwrap();
            assert_eq!(dev.check(RepairMode::None).unwrap().corruptions, 0);
            drop(dev);
            assert_qemu_check_clean(&p, "vdi");
            assert_eq!(
                qemu_info_json(&p, "vdi")["virtual-size"].as_u64(),
                Some(new)
            );
            assert_eq!(qemu_read_raw(&p, "vdi"), expect, "{opts} {new}");
            // qemu can keep writing to the grown image.
            qemu_io(&p, "vdi", &["write -P 0x63 1M 512"]);
            expect[1 << 20..(1 << 20) + 512].fill(0x63);
            assert_qemu_check_clean(&p, "vdi");
            assert_eq!(read_all(open(&p, true).as_ref()), expect);
        }
    }
}

#[test]
fn shrink_refused_and_same_block_count_grow() {
    let dir = tempdir();
    let p = dir.path().join("s.vdi");
    qemu_img_ok(&["create", "-q", "-f", "vdi", &p.to_string_lossy(), "1000k"]);
    let dev = open(&p, false);
    assert!(dev.resize(512 << 10, Preallocation::Off, false).is_err());
    assert!(
        dev.resize(512 << 10, Preallocation::Off, true)
            .unwrap_err()
            .is_unsupported()
    );
    assert!(dev.resize(8 << 20, Preallocation::Full, false).is_err());
    dev.resize(1 << 20, Preallocation::Off, false).unwrap();
    drop(dev);
    assert_qemu_check_clean(&p, "vdi");
    assert_eq!(
        qemu_info_json(&p, "vdi")["virtual-size"].as_u64(),
        Some(1 << 20)
    );
}
