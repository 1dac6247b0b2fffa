//! The stream-optimized writer in two steps (`compress_units` on any thread, then
//! `write_compressed_units`), checked with qemu-img.

use diskimg_blockio::{CompressedUnits, PackedUnit};
use diskimg_testutil::{assert_qemu_check_clean, pattern, qemu_read_raw, read_all, tempdir};

use crate::common::{create, open};

#[test]
fn grains_compressed_on_threads_are_appended_in_order() {
    let dir = tempdir();
    let img = dir.path().join("s.vmdk");
    // A partial last grain of 4 KiB.
    let size = (8 << 20) + 4096;
    create(&img, size, "subformat=streamOptimized").unwrap();
    let dev = open(&img, false).unwrap();
    assert!(dev.needs_compressed_writes());
    let g = dev.compressed_write_granularity().unwrap() as usize;
    let mut want = vec![0u8; size as usize];
    let run = pattern(3, 5 * g);
    let tail = pattern(4, 4096);
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| dev.compress_units(&run, 2 * g as u64).unwrap());
        let b = sc.spawn(|| dev.compress_units(&tail, size - 4096).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!((a.units.len(), b.units.len()), (5, 1));
    assert_eq!(read_all(dev.as_ref()), want, "nothing written yet");
    // Records of other grains, plain units and runs of the wrong shape are refused.
    let moved = CompressedUnits {
        offset: 40 * g as u64,
        ..a.clone()
    };
    assert!(dev.write_compressed_units(moved).is_err());
    let plain = CompressedUnits {
        offset: 0,
        len: g as u64,
        units: vec![PackedUnit::Plain(vec![1; g])],
    };
    assert!(dev.write_compressed_units(plain).is_err());
    let mut short = a.clone();
    short.units.pop();
    assert!(dev.write_compressed_units(short).is_err());
    dev.write_compressed_units(b).unwrap();
    dev.write_compressed_units(a.clone()).unwrap();
    want[2 * g..7 * g].copy_from_slice(&run);
    want[size as usize - 4096..].copy_from_slice(&tail);
    let err = dev.write_compressed_units(a).unwrap_err().to_string();
    assert!(err.contains("streamOptimized"), "{err}");
    dev.flush().unwrap();
    assert_eq!(read_all(dev.as_ref()), want);
    drop(dev);
    assert_qemu_check_clean(&img, "vmdk");
    assert_eq!(qemu_read_raw(&img, "vmdk"), want);
}
