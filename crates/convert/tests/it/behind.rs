//! `WriteBehind`: large writes in flight on helper threads (convert's `-t none` target).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diskimg_blockio::{
    BlockDevice, CacheMode, CrashMode, CreateRequest, Driver, Error, FaultStorage, FileStorage,
    MemStorage, OpenOptions, OptionList, Result, Storage, forward_storage,
};
use diskimg_convert::{ConvertOptions, MIN_BEHIND, WriteBehind, convert};
use diskimg_raw::RawDevice;
use diskimg_testutil::{assert_qemu_check_clean, pattern, qemu_compare};

/// A memory storage whose large writes take a while, recording every write and how many
/// ran at once; writes at or past `fail_at` fail.
#[derive(Debug, Default)]
struct Slow {
    mem: MemStorage,
    writes: Mutex<Vec<(u64, usize)>>,
    now: AtomicUsize,
    most: AtomicUsize,
    fail_at: Option<u64>,
    panic_at: Option<u64>,
}

impl Storage for Slow {
    forward_storage!(mem: read_exact_at, len, set_len);
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        if buf.len() >= MIN_BEHIND {
            std::thread::sleep(Duration::from_millis(3));
        }
        assert!(self.panic_at != Some(offset), "injected panic");
        let r = match self.fail_at {
            Some(f) if offset >= f => Err(Error::io(
                format!("could not write {} bytes at offset {offset}", buf.len()),
                std::io::Error::from_raw_os_error(5),
            )),
            _ => self.mem.write_all_at(buf, offset),
        };
        self.writes.lock().unwrap().push((offset, buf.len()));
        self.now.fetch_sub(1, Ordering::SeqCst);
        r
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Overlapping large and small writes land exactly once, in the order they were made;
/// reads and `len` see writes still in flight; several large writes run at once.
#[test]
fn writes_land_once_in_order_and_reads_see_them() {
    let slow = Arc::new(Slow::default());
    let wb = WriteBehind::new(slow.clone(), 4);
    let model = MemStorage::new();
    let big = MIN_BEHIND * 2;
    let mut large = 0;
    for k in 0..40u64 {
        // Mostly appends, every fifth over an earlier range, small writes in between.
        let off = if k % 5 == 4 {
            (k - 3) * big as u64 + 1000
        } else {
            k * big as u64
        };
        let data = pattern(k, big);
        wb.write_all_at(&data, off).unwrap();
        model.write_all_at(&data, off).unwrap();
        large += 1;
        assert_eq!(wb.len().unwrap(), model.len().unwrap(), "write {k}");
        if k % 3 == 0 {
            let small = pattern(100 + k, 512);
            let at = off + 4096;
            wb.write_all_at(&small, at).unwrap();
            model.write_all_at(&small, at).unwrap();
            let mut a = vec![0u8; 8192];
            let mut b = vec![0u8; 8192];
            wb.read_exact_at(&mut a, at - 100).unwrap();
            model.read_exact_at(&mut b, at - 100).unwrap();
            assert!(a == b, "read after write {k}");
        }
    }
    wb.flush().unwrap();
    assert_eq!(slow.mem.to_vec(), model.to_vec());
    let writes = slow.writes.lock().unwrap().clone();
    assert_eq!(writes.iter().filter(|w| w.1 == big).count(), large);
    let most = slow.most.load(Ordering::SeqCst);
    assert!((2..=4).contains(&most), "{most} writes at once");
    // Past the end of what reached the inner storage, but inside a write in flight.
    let tail = slow.mem.len().unwrap();
    let data = pattern(7, big);
    wb.write_all_at(&data, tail + 4096).unwrap();
    let mut back = vec![0u8; 4096 + big];
    wb.read_exact_at(&mut back, tail).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0) && back[4096..] == data[..]);
    wb.set_len(tail + 8192).unwrap();
    assert_eq!(slow.mem.len().unwrap(), tail + 8192);
}

/// A file grown ahead of its writes: the inner file grows in steps while `len` and
/// reads see what was written; every flush (and the drop) cuts it back to that length.
#[test]
fn a_file_grown_ahead_shows_and_keeps_only_what_was_written() {
    let slow = Arc::new(Slow::default());
    let step = 1u64 << 20;
    let wb = WriteBehind::new(slow.clone(), 4).grow_ahead(step - 1000);
    let model = MemStorage::new();
    let big = MIN_BEHIND * 2;
    let mut grown = 0;
    for k in 0..30u64 {
        let off = k * big as u64 + if k > 20 { 5000 } else { 0 };
        let data = pattern(k, big);
        wb.write_all_at(&data, off).unwrap();
        model.write_all_at(&data, off).unwrap();
        // Metadata-sized writes past the end grow the file as well.
        if k % 7 == 6 {
            let at = model.len().unwrap() + 512;
            wb.write_all_at(&[9; 512], at).unwrap();
            model.write_all_at(&[9; 512], at).unwrap();
        }
        let (len, inner) = (model.len().unwrap(), slow.mem.len().unwrap());
        assert_eq!(wb.len().unwrap(), len, "write {k}");
        assert!(
            inner >= len && inner % step == 0,
            "write {k}: {inner} for {len}"
        );
        if inner > grown {
            // A step ahead of the write that grew it.
            assert!(
                inner >= len + step - 2 * big as u64,
                "write {k}: {inner} for {len}"
            );
            grown = inner;
        }
        let mut b = [0u8; 16];
        assert!(
            wb.read_exact_at(&mut b, len - 8).is_err(),
            "read past the end"
        );
        wb.read_exact_at(&mut b, len - 16).unwrap();
        let mut m = [0u8; 16];
        model.read_exact_at(&mut m, len - 16).unwrap();
        assert_eq!(b, m);
        if k == 12 {
            wb.flush().unwrap();
            assert_eq!(slow.mem.to_vec(), model.to_vec(), "after a flush");
        }
    }
    assert!(grown >= 4 * step && grown < 6 * step, "grown to {grown}");
    drop(wb);
    assert_eq!(slow.mem.to_vec(), model.to_vec(), "after the drop");
}

/// A write that fails on a helper thread is reported by the next call and by every
/// later one; the caller's write returned before it failed.
#[test]
fn a_failed_write_in_flight_is_reported() {
    let fail_at = 10 * MIN_BEHIND as u64;
    let slow = Arc::new(Slow {
        fail_at: Some(fail_at),
        ..Slow::default()
    });
    let wb = WriteBehind::new(slow.clone(), 2);
    wb.write_all_at(&pattern(1, MIN_BEHIND), 0).unwrap();
    wb.write_all_at(&pattern(2, MIN_BEHIND), fail_at).unwrap();
    let e = wb.flush().unwrap_err().to_string();
    assert!(e.contains(&format!("at offset {fail_at}")), "{e}");
    assert!(wb.write_all_at(&[1; 512], 0).is_err());
    assert!(wb.flush().is_err());
    let mut b = [0u8; 16];
    assert!(wb.read_exact_at(&mut b, 0).is_err());
    // The write before it landed.
    assert_eq!(slow.mem.to_vec()[..MIN_BEHIND], pattern(1, MIN_BEHIND)[..]);
    drop(wb);
    assert_eq!(slow.writes.lock().unwrap().len(), 2);
}

/// A storage that panics under a writer thread fails the calls after it instead of
/// leaving them waiting.
#[test]
fn a_panicking_write_in_flight_is_an_error() {
    let slow = Arc::new(Slow {
        panic_at: Some(0),
        ..Slow::default()
    });
    let wb = WriteBehind::new(slow, 1);
    wb.write_all_at(&pattern(1, MIN_BEHIND), 0).unwrap();
    let e = wb.flush().unwrap_err().to_string();
    assert!(e.contains("panicked"), "{e}");
    assert!(wb.write_all_at(&pattern(1, MIN_BEHIND), 1 << 20).is_err());
}

fn qcow2_source(dir: &std::path::Path, size: usize) -> (std::path::PathBuf, Arc<dyn BlockDevice>) {
    // Data, zero blocks inside data, and holes.
    let mut bytes = vec![0u8; size];
    for (i, c) in bytes.chunks_mut(96 << 10).enumerate() {
        if i % 3 != 1 {
            c.copy_from_slice(&pattern(i as u64, c.len()));
            c[..8192].fill(0);
        }
    }
    let path = dir.join("src.raw");
    std::fs::write(&path, &bytes).unwrap();
    let s = FileStorage::open(&path, true).unwrap();
    (path, Arc::new(RawDevice::new(Arc::new(s), true).unwrap()))
}

/// Convert into a qcow2 opened with `O_DIRECT` behind [`WriteBehind`], as `convert -t
/// none` does: qemu-img finds it equal to the source and clean.
#[test]
fn convert_to_qcow2_with_writes_in_flight_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (src_path, src) = qcow2_source(dir.path(), 9 << 20);
    let out = dir.path().join("out.qcow2");
    let base: Arc<dyn Storage> = Arc::new(FileStorage::create(&out).unwrap());
    let mut req = CreateRequest::new(src.virtual_size(), OptionList::new());
    diskimg_qcow2::DRIVER.create(base, &mut req).unwrap();
    let file = FileStorage::open_with(&out, false, CacheMode::None).unwrap();
    let wb: Arc<dyn Storage> = Arc::new(WriteBehind::new(Arc::new(file), 4));
    let dst = diskimg_qcow2::DRIVER.open(wb, &OpenOptions::new()).unwrap();
    let opts = ConvertOptions {
        target_is_zero: true,
        chunk_size: 256 << 10,
        workers: 3,
        ..ConvertOptions::default()
    };
    convert(src.as_ref(), dst.as_ref(), &opts, &mut |_, _| {}).unwrap();
    dst.close().unwrap();
    drop(dst);
    assert!(qemu_compare(&src_path, "raw", &out, "qcow2"));
    assert_qemu_check_clean(&out, "qcow2");
}

/// A crash anywhere in a conversion through [`WriteBehind`] leaves a qcow2 without
/// corruption, whichever unflushed writes survive.
#[test]
fn a_crash_during_convert_leaves_a_consistent_qcow2() {
    crash_during_convert("cluster_size=16k", OpenOptions::new(), 0);
}

/// The same with qcow2's deferred L2 tables (`x-deferred-tables=on`, as `convert -t
/// none` opens its target) and small clusters, so that many tables are new.
#[test]
fn a_crash_during_convert_with_deferred_tables_leaves_a_consistent_qcow2() {
    let mut o = OpenOptions::new();
    o.driver_options.set("x-deferred-tables", "on");
    crash_during_convert("cluster_size=2k", o, 0);
}

/// The same with the file grown ahead of the writes (as `convert -t none` does): a
/// crash may leave a hole at the end of the file, never a corrupt image.
#[test]
fn a_crash_during_convert_into_a_file_grown_ahead_leaves_a_consistent_qcow2() {
    let mut o = OpenOptions::new();
    o.driver_options.set("x-deferred-tables", "on");
    crash_during_convert("cluster_size=4k", o, 256 << 10);
}

fn crash_during_convert(create: &str, open: OpenOptions, grow: u64) {
    let size = 3u64 << 20;
    let src: Arc<dyn BlockDevice> = {
        let mut b = vec![0u8; size as usize];
        for (i, c) in b
            .chunks_mut(200 << 10)
            .enumerate()
            .filter(|(i, _)| i % 4 != 2)
        {
            c.copy_from_slice(&pattern(i as u64 + 9, c.len()));
        }
        Arc::new(RawDevice::new(Arc::new(MemStorage::from_vec(b)), true).unwrap())
    };
    let base: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let opts = OptionList::parse(create).unwrap();
    diskimg_qcow2::DRIVER
        .create(base.clone(), &mut CreateRequest::new(size, opts))
        .unwrap();
    let initial = (base.as_ref() as &dyn Storage)
        .len()
        .map(|n| {
            let mut v = vec![0u8; n as usize];
            base.read_exact_at(&mut v, 0).unwrap();
            v
        })
        .unwrap();
    let run = |fs: Arc<FaultStorage>| -> bool {
        let wb: Arc<dyn Storage> = Arc::new(WriteBehind::new(fs, 3).grow_ahead(grow));
        let Ok(dst) = diskimg_qcow2::DRIVER.open(wb, &open) else {
            return false;
        };
        let opts = ConvertOptions {
            target_is_zero: true,
            chunk_size: 128 << 10,
            workers: 2,
            ..ConvertOptions::default()
        };
        convert(src.as_ref(), dst.as_ref(), &opts, &mut |_, _| {}).is_ok() && dst.close().is_ok()
    };
    let clean = Arc::new(FaultStorage::new(initial.clone(), None));
    assert!(run(clean.clone()));
    let count = clean.ops();
    let img: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(
        clean.crash_image(CrashMode::DropUnflushed),
    ));
    let dev = diskimg_qcow2::DRIVER
        .open(img, &OpenOptions::new().read_only(true))
        .unwrap();
    assert!(diskimg_testutil::read_all(dev.as_ref()) == diskimg_testutil::read_all(src.as_ref()));
    assert!(count > 20, "{count} operations");
    let dir = diskimg_testutil::tempdir();
    let qpath = dir.path().join("cut.qcow2");
    let step = usize::try_from(count / 40).unwrap_or(1).max(1);
    for (k, cut) in (0..count).step_by(step).enumerate() {
        let fs = Arc::new(FaultStorage::new(initial.clone(), Some(cut)));
        let ok = run(fs.clone());
        assert_eq!(ok, !fs.crashed(), "cut {cut} of {count}, {} ops", fs.ops());
        for mode in [
            CrashMode::KeepAll,
            CrashMode::DropUnflushed,
            CrashMode::Random(cut),
        ] {
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fs.crash_image(mode)));
            let dev = diskimg_qcow2::DRIVER
                .open(s, &OpenOptions::new().read_only(true))
                .unwrap();
            let r = dev.check(Default::default()).unwrap();
            assert_eq!(
                (r.corruptions, r.check_errors),
                (0, 0),
                "cut {cut} {mode:?}: {r:?}"
            );
            if k % 4 == 0 && mode != CrashMode::KeepAll {
                std::fs::write(&qpath, fs.crash_image(mode)).unwrap();
                let (v, _) = diskimg_testutil::qemu_check_json(&qpath, "qcow2");
                let n = |k: &str| v[k].as_u64().unwrap_or(0);
                assert_eq!(
                    (n("corruptions"), n("check-errors")),
                    (0, 0),
                    "cut {cut}: {v}"
                );
                assert_eq!(n("leaks"), r.leaks, "cut {cut} {mode:?}: {v}");
            }
        }
    }
}
