//! Crash consistency of deleting an internal snapshot (`snapshot -d`), which frees and
//! discards (punches) the clusters only the snapshot held, as qemu does. The storage is
//! cut at every operation of the delete; under every crash mode the image must have no
//! corruption (our check, and `qemu-img check` with the same leaks on every third cut),
//! the active disk and the other snapshot must read as before, and the deleted snapshot,
//! when the crash left it in the table, must still read whole (nothing it uses was
//! punched).

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, CrashMode, Driver, FaultStorage, MemStorage, OpenOptions};
use diskimg_qcow2::{DRIVER, Qcow2Device};
use diskimg_testutil::{assert_qemu_check_clean, read_all, tempdir};

use crate::crash_harness::{Judge, image};

const SIZE: u64 = 256 << 10;

fn q2(dev: &dyn BlockDevice) -> &Qcow2Device {
    dev.as_any().downcast_ref::<Qcow2Device>().unwrap()
}

/// An image with snapshots `a` and `b` (512-byte clusters: many L2 tables, refcount
/// blocks and freed runs), what each holds, and what the active disk holds.
fn setup() -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let mem = Arc::new(MemStorage::from_vec(image(SIZE, "cluster_size=512")));
    let dev = DRIVER.open(mem.clone(), &OpenOptions::new()).unwrap();
    dev.write_at(&[1; 100 << 10], 0).unwrap();
    dev.write_at(&[2; 30 << 10], 150 << 10).unwrap();
    let a = read_all(dev.as_ref());
    q2(dev.as_ref()).create_snapshot("a").unwrap();
    dev.write_at(&[3; 40 << 10], 20 << 10).unwrap();
    dev.write_at(&[4; 10 << 10], 160 << 10).unwrap();
    let b = read_all(dev.as_ref());
    q2(dev.as_ref()).create_snapshot("b").unwrap();
    dev.write_at(&[5; 50 << 10], 10 << 10).unwrap();
    let active = read_all(dev.as_ref());
    dev.close().unwrap();
    (mem.to_vec(), a, b, active)
}

fn snapshot(dev: &dyn BlockDevice, name: &str) -> Option<Vec<u8>> {
    let q = q2(dev);
    q.snapshots().iter().any(|s| s.name == name).then(|| {
        let s = q.open_snapshot(name).unwrap();
        read_all(s.as_ref())
    })
}

#[test]
fn crash_while_deleting_a_snapshot() {
    let (initial, a, b, active) = setup();
    let delete = |fs: Arc<FaultStorage>| {
        let Ok(dev) = DRIVER.open(fs, &OpenOptions::new()) else {
            return false;
        };
        q2(dev.as_ref()).delete_snapshot("a").is_ok() && dev.close().is_ok()
    };
    let clean = Arc::new(FaultStorage::new(initial.clone(), None));
    assert!(delete(clean.clone()));
    let count = clean.ops();
    assert!(count > 10, "{count}");
    let dir = tempdir();
    let path = dir.path().join("crash.qcow2");
    std::fs::write(&path, clean.crash_image(CrashMode::DropUnflushed)).unwrap();
    assert_qemu_check_clean(&path, "qcow2");
    let judge = Judge::new(&path, 3, CrashMode::KeepAll);
    for cut in 0..count {
        let fs = Arc::new(FaultStorage::new(initial.clone(), Some(cut)));
        assert!(!delete(fs.clone()), "cut {cut}: the run did not fail");
        judge.images(&fs, cut, |c| {
            assert!(read_all(c.dev) == active, "{}: active disk", c.what);
            assert!(
                snapshot(c.dev, "b") == Some(b.clone()),
                "{}: snapshot b",
                c.what
            );
            if let Some(got) = snapshot(c.dev, "a") {
                assert!(
                    got == a,
                    "{}: snapshot a left in the table reads wrong",
                    c.what
                );
            }
        });
    }
}
