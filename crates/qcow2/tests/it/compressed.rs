//! Compressed writes in two steps (`compress_units` on any thread, then
//! `write_compressed_units`), checked with qemu-img.

use diskimg_blockio::{BlockDevice, CompressedUnits, PackedUnit};
use diskimg_testutil::{assert_qemu_check_clean, pattern, qemu_map_json, qemu_read_raw, tempdir};

use crate::{create, open};

fn text(len: usize, seed: usize) -> Vec<u8> {
    let words = b"qcow2 clusters compressed ahead of their write ";
    (0..len).map(|i| words[(i + seed) % words.len()]).collect()
}

#[test]
fn units_compressed_on_threads_are_stored_in_order() {
    let dir = tempdir();
    for opts in ["", "compression_type=zstd", "cluster_size=4k"] {
        let p = dir.path().join("c.qcow2");
        // A partial last cluster of 8 KiB.
        let size = (4 << 20) + 8192;
        create(&p, size, opts).unwrap();
        let dev = open(&p, false);
        let cs = dev.compressed_write_granularity().unwrap() as usize;
        let mut want = vec![0u8; size as usize];
        // Four clusters: text, random (incompressible: stored plainly), text, text.
        let mut run = text(4 * cs, 1);
        run[cs..2 * cs].copy_from_slice(&pattern(5, cs));
        let tail = text(8192, 7);
        let (a, b) = std::thread::scope(|sc| {
            let a = sc.spawn(|| dev.compress_units(&run, cs as u64).unwrap());
            let b = sc.spawn(|| dev.compress_units(&tail, size - 8192).unwrap());
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(a.units.len(), 4);
        assert!(matches!(a.units[1], PackedUnit::Plain(_)), "{opts}");
        assert!(
            a.units
                .iter()
                .enumerate()
                .all(|(i, u)| i == 1 || matches!(u, PackedUnit::Compressed(c) if c.len() < cs / 2))
        );
        assert_eq!(b.units.len(), 8192usize.div_ceil(cs));
        assert!(
            b.units
                .iter()
                .all(|u| matches!(u, PackedUnit::Compressed(_)))
        );
        // Nothing was written yet.
        assert_eq!(read(dev.as_ref()), want);
        let len_before = std::fs::metadata(&p).unwrap().len();
        // Malformed runs are refused without writing.
        let mut short = a.clone();
        short.units.pop();
        assert!(dev.write_compressed_units(short).is_err());
        let huge = CompressedUnits {
            offset: 0,
            len: cs as u64,
            units: vec![PackedUnit::Compressed(vec![1; cs])],
        };
        assert!(dev.write_compressed_units(huge).is_err());
        dev.write_compressed_units(a.clone()).unwrap();
        dev.write_compressed_units(b).unwrap();
        want[cs..5 * cs].copy_from_slice(&run);
        want[size as usize - 8192..].copy_from_slice(&tail);
        // Allocated clusters are refused, and the refusal writes nothing.
        let len_after = std::fs::metadata(&p).unwrap().len();
        assert!(dev.write_compressed_units(a).is_err());
        assert!(len_after > len_before);
        dev.flush().unwrap();
        assert_eq!(read(dev.as_ref()), want);
        drop(dev);
        // (A flush may grow the file over clusters allocated ahead; closing returns them.)
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len_after);
        assert_qemu_check_clean(&p, "qcow2");
        assert_eq!(qemu_read_raw(&p, "qcow2"), want, "{opts}");
        let map = qemu_map_json(&p, "qcow2");
        let compressed: Vec<u64> = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["compressed"] == true)
            .map(|e| e["start"].as_u64().unwrap())
            .collect();
        assert_eq!(
            compressed,
            vec![cs as u64, 3 * cs as u64, size - 8192],
            "{opts}"
        );
        std::fs::remove_file(&p).unwrap();
    }
}

fn read(dev: &dyn BlockDevice) -> Vec<u8> {
    diskimg_testutil::read_all(dev)
}
