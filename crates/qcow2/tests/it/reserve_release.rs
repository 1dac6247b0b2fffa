//! Giving the cluster reserve back (`engine/reserve.rs`, `Meta::release_reserve`) must
//! never cut guest data. A 4 KiB write into a fresh cluster at the end of the file
//! writes only its own bytes, so the file may end inside that cluster; a reserve grown
//! after it and given back later used to shrink the file to that old length, dropping
//! whatever an in-place overwrite had put further into the same cluster meanwhile
//! (seen as "private range reads wrong" in the multi-writer stress test once a guest
//! discard gave the reserve back, session 7).

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions, OptionList};
use diskimg_qcow2::DRIVER;

const CLUSTER: u64 = 65536;
const BLOCK: usize = 4096;

fn fresh() -> (Arc<MemStorage>, Arc<dyn BlockDevice>) {
    let s = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(16 << 20, OptionList::parse("").unwrap());
    DRIVER.create(s.clone(), &mut req).unwrap();
    let dev = DRIVER.open(s.clone(), &OpenOptions::new()).unwrap();
    (s, dev)
}

/// Whether the block at `off` reads as `byte` throughout.
fn holds(dev: &dyn BlockDevice, off: u64, byte: u8) -> bool {
    let mut b = vec![0u8; BLOCK];
    dev.read_at(&mut b, off).unwrap();
    b.iter().all(|&x| x == byte)
}

/// Two fresh clusters (the file ends 4 KiB into the second), a flush (it reserves
/// clusters past the end), an in-place write further into the second cluster, then
/// whatever gives the reserve back: the last write must survive, in the open device
/// and after reopening.
fn survives(give_back: impl Fn(&dyn BlockDevice)) {
    let (s, dev) = fresh();
    dev.write_at(&[1u8; BLOCK], 0).unwrap();
    dev.write_at(&[2u8; BLOCK], CLUSTER).unwrap();
    dev.flush().unwrap();
    let late = CLUSTER + 8 * BLOCK as u64;
    dev.write_at(&[3u8; BLOCK], late).unwrap();
    give_back(dev.as_ref());
    assert!(holds(dev.as_ref(), late, 3), "open device");
    dev.close().unwrap();
    drop(dev);
    let dev = DRIVER.open(s, &OpenOptions::new()).unwrap();
    assert!(holds(dev.as_ref(), 0, 1));
    assert!(holds(dev.as_ref(), CLUSTER, 2));
    assert!(
        holds(dev.as_ref(), late, 3),
        "reopened: the write was cut off"
    );
    let report = dev.check(diskimg_blockio::RepairMode::None).unwrap();
    assert_eq!(report.corruptions, 0, "{report:?}");
    assert_eq!(report.leaks, 0, "{report:?}");
}

#[test]
fn close_keeps_data_written_past_the_old_end() {
    survives(|_| {});
}

#[test]
fn resize_keeps_data_written_past_the_old_end() {
    survives(|dev| {
        dev.resize(32 << 20, diskimg_blockio::Preallocation::Off, false)
            .unwrap()
    });
}
