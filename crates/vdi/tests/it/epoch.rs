//! The host epoch (`BlockDevice::host_epoch`): constant for vdi while guest I/O runs
//! (blocks are only appended, VDI has no discard); growing the image past the block
//! map's room moves the first data blocks, and the epoch with them.

use diskimg_blockio::{Driver, FileStorage, Preallocation, Storage};
use diskimg_testutil::epoch::{check_constant_epoch, host_bytes, host_runs, late_read};
use diskimg_testutil::{pattern, qemu_create, tempdir};

use crate::open;

#[test]
fn constant_while_open() {
    check_constant_epoch(&diskimg_vdi::DRIVER, "vdi", "", 1 << 20);
    check_constant_epoch(&diskimg_vdi::DRIVER, "vdi", "static=on", 1 << 20);
}

#[test]
fn growing_moves_blocks_and_the_epoch() {
    let dir = tempdir();
    let p = dir.path().join("g.vdi");
    qemu_create(&p, "vdi", "", Some("3M"));
    let s: std::sync::Arc<dyn Storage> = std::sync::Arc::new(FileStorage::open(&p, false).unwrap());
    let dev = diskimg_vdi::DRIVER
        .open(s.clone(), &Default::default())
        .unwrap();
    let data = pattern(7, 1 << 20);
    dev.write_at(&data, 0).unwrap();
    // Within the map's room (3M to 100M): nothing moves.
    let grow = |to: u64| {
        move |d: &dyn diskimg_blockio::BlockDevice| {
            d.resize(to, Preallocation::Off, false).unwrap();
            Vec::new()
        }
    };
    assert!(late_read(
        dev.as_ref(),
        s.as_ref(),
        0,
        1 << 20,
        &mut grow(100 << 20)
    ));
    // Past it (300M): the block map needs the first data block's place.
    let runs = host_runs(dev.as_ref(), s.as_ref(), 0, 1 << 20);
    let e = dev.host_epoch().unwrap();
    assert!(!late_read(
        dev.as_ref(),
        s.as_ref(),
        0,
        1 << 20,
        &mut grow(300 << 20)
    ));
    assert_ne!(dev.host_epoch().unwrap(), e);
    let (_, n, h) = runs[0];
    assert_ne!(
        host_bytes(s.as_ref(), h, n),
        data[..n as usize],
        "the block did not move: the epoch need not have"
    );
    let mut back = vec![0u8; 1 << 20];
    dev.read_at(&mut back, 0).unwrap();
    assert_eq!(back, data);
    let ro = open(&p, true);
    assert_eq!(ro.host_epoch(), Some(0));
}
