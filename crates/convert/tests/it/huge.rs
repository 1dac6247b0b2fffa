//! A terabyte of holes costs a handful of block-status calls, not one per chunk; data after
//! a hole still goes out in chunks on the chunk grid.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use diskimg_blockio::{BlockDevice, Extent, FileStorage, Result, Storage, forward_device};
use diskimg_convert::{ConvertOptions, convert};
use diskimg_raw::RawDevice;

const TIB: u64 = 1 << 40;

/// A source that counts `map` calls.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn BlockDevice>,
    maps: AtomicU64,
}

impl BlockDevice for Counting {
    forward_device!(inner: info, read_at, write_at, flush);
    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        self.maps.fetch_add(1, Ordering::Relaxed);
        self.inner.map(off, len)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn sparse_raw(path: &std::path::Path, data: &[(u64, u8)]) -> Arc<dyn BlockDevice> {
    let s = FileStorage::create(path).unwrap();
    s.set_len(TIB).unwrap();
    for &(off, b) in data {
        s.write_all_at(&[b; 65536], off).unwrap();
    }
    Arc::new(RawDevice::new(Arc::new(s), false).unwrap())
}

#[test]
fn terabyte_of_holes_is_skipped_in_few_calls() {
    let dir = tempfile::tempdir().unwrap();
    let data = [(0u64, 1u8), (300 << 30, 2), (TIB - 65536, 3)];
    let src = Counting {
        inner: sparse_raw(&dir.path().join("src.raw"), &data),
        maps: AtomicU64::new(0),
    };
    for (i, (workers, ooo)) in [(1usize, false), (4, false), (4, true)]
        .into_iter()
        .enumerate()
    {
        src.maps.store(0, Ordering::Relaxed);
        let dst = sparse_raw(&dir.path().join(format!("dst{i}.raw")), &[]);
        let opts = ConvertOptions {
            target_is_zero: true,
            workers,
            out_of_order: ooo,
            ..ConvertOptions::default()
        };
        let mut last = (0, 0);
        let st = convert(&src, dst.as_ref(), &opts, &mut |d, t| last = (d, t)).unwrap();
        assert_eq!(last, (TIB, TIB));
        assert_eq!(st.data_bytes, 3 * 65536, "workers {workers} ooo {ooo}");
        assert_eq!(st.skipped_bytes, TIB - 3 * 65536);
        // With 2 MiB chunks a walk would need 524288 calls.
        let maps = src.maps.load(Ordering::Relaxed);
        assert!(maps < 100, "{maps} map calls (workers {workers} ooo {ooo})");
        for &(off, b) in &data {
            let mut buf = vec![0u8; 65536];
            dst.read_at(&mut buf, off).unwrap();
            assert!(buf.iter().all(|&x| x == b), "at {off}");
        }
    }
}

/// Data after a hole of any length still goes out in chunks on the 2 MiB grid (whole
/// clusters of a qcow2 target, one allocation per chunk), not in chunks starting where
/// the hole ended.
#[test]
fn chunks_after_a_hole_stay_on_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let mib = 1u64 << 20;
    // 64 KiB pieces from 5 MiB + 64 KiB to 9 MiB: the hole before ends off the grid.
    let data: Vec<(u64, u8)> = (0..63).map(|k| (5 * mib + (k + 1) * 65536, 7)).collect();
    let src = sparse_raw(&dir.path().join("src.raw"), &data);
    for workers in [1usize, 4] {
        let dst = crate::modes::Probe {
            inner: sparse_raw(&dir.path().join(format!("dst{workers}.raw")), &[]),
            bad: u64::MAX,
            writes: std::sync::Mutex::default(),
        };
        let opts = ConvertOptions {
            target_is_zero: true,
            workers,
            ..ConvertOptions::default()
        };
        let st = convert(src.as_ref(), &dst, &opts, &mut |_, _| {}).unwrap();
        assert_eq!(st.data_bytes, 63 * 65536);
        let writes = dst.writes.lock().unwrap().clone();
        assert!(
            writes
                .iter()
                .all(|&(o, l)| o / (2 * mib) == (o + l - 1) / (2 * mib)),
            "workers {workers}: {writes:?}"
        );
        // 5 MiB + 64 KiB .. 6 MiB, 6..8 MiB, 8..9 MiB.
        assert_eq!(writes.len(), 3, "{writes:?}");
    }
}
