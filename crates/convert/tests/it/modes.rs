//! Sparse behaviour, backing-aware targets, concatenation and compression.

use std::any::Any;
use std::sync::{Arc, Mutex};

use diskimg_blockio::{
    BlockDevice, CompressedUnits, Error, FileStorage, MemStorage, PackedUnit, Result, Storage,
    forward_device, forward_storage, map_all,
};
use diskimg_convert::{ConcatDevice, ConvertOptions, convert};
use diskimg_raw::RawDevice;

fn raw(bytes: Vec<u8>) -> Arc<dyn BlockDevice> {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
    Arc::new(RawDevice::new(st, false).unwrap())
}

fn read(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn sparse_file_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str, len: u64| -> Arc<dyn BlockDevice> {
        let s = FileStorage::create(dir.path().join(name)).unwrap();
        s.set_len(len).unwrap();
        Arc::new(RawDevice::new(Arc::new(s), false).unwrap())
    };
    let src = open("src.raw", 8 << 20);
    src.write_at(&[7; 65536], 1 << 20).unwrap();
    // Zero bytes written as data: detected by the -S scan.
    src.write_at(&[0; 65536], 4 << 20).unwrap();
    let dst = open("dst.raw", 8 << 20);
    let opts = ConvertOptions {
        target_is_zero: true,
        ..ConvertOptions::default()
    };
    let st = convert(src.as_ref(), dst.as_ref(), &opts, &mut |_, _| {}).unwrap();
    assert_eq!(st.data_bytes, 65536);
    assert_eq!(st.zeroed_bytes, 0);
    assert_eq!(read(dst.as_ref()), read(src.as_ref()));
    let data: u64 = map_all(dst.as_ref(), 0, 8 << 20)
        .unwrap()
        .iter()
        .filter(|e| matches!(e.kind, diskimg_blockio::ExtentKind::Data { .. }))
        .map(|e| e.len)
        .sum();
    assert!(data <= 65536 * 2, "target not sparse: {data} data bytes");

    // -S 0: fully allocated.
    let full = open("full.raw", 8 << 20);
    let opts = ConvertOptions {
        sparse_size: 0,
        target_is_zero: true,
        ..ConvertOptions::default()
    };
    let st = convert(src.as_ref(), full.as_ref(), &opts, &mut |_, _| {}).unwrap();
    assert_eq!(st.data_bytes, 8 << 20);
    let ext = map_all(full.as_ref(), 0, 8 << 20).unwrap();
    assert_eq!(ext.len(), 1, "{ext:?}");
}

#[test]
fn junk_target_gets_zeroes() {
    let mut s = vec![0u8; 1 << 20];
    s[100] = 1;
    let src = raw(s.clone());
    let dst = raw(vec![0xff; 1 << 20]);
    let st = convert(
        src.as_ref(),
        dst.as_ref(),
        &ConvertOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(read(dst.as_ref()), s);
    assert_eq!(st.data_bytes, 4096);
    assert_eq!(st.zeroed_bytes, (1 << 20) - 4096);
}

#[test]
fn smaller_target_refused() {
    let src = raw(vec![1; 8192]);
    let dst = raw(vec![0; 4096]);
    assert!(
        convert(
            src.as_ref(),
            dst.as_ref(),
            &ConvertOptions::default(),
            &mut |_, _| {}
        )
        .is_err()
    );
}

#[test]
fn backing_equal_ranges_are_skipped() {
    let base: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let mut top = base.clone();
    top[20000..20010].fill(0xee);
    top[40960..45056].fill(0);
    let src = raw(top.clone());
    let backing = raw(base.clone());
    // The "target" here records writes; it starts empty (reads through to nothing).
    let dst = raw(vec![0; 65536]);
    let opts = ConvertOptions {
        backing: Some(backing),
        ..ConvertOptions::default()
    };
    let st = convert(src.as_ref(), dst.as_ref(), &opts, &mut |_, _| {}).unwrap();
    // Only the 4 KiB block holding the change and the zeroed block are written.
    assert_eq!(st.data_bytes, 4096, "{st:?}");
    assert_eq!(st.zeroed_bytes, 4096, "{st:?}");
    let out = read(dst.as_ref());
    assert_eq!(out[16384..20480], top[16384..20480]);
    assert_eq!(out[40960..45056], [0; 4096]);
    assert_eq!(out[0..4096], [0; 4096], "equal range was written");
}

#[test]
fn concatenation() {
    // Whole sectors: raw rounds sizes up to 512 as qemu does.
    let a = raw(vec![1; 5120]);
    let b = raw(vec![0; 3072]);
    let c = raw(vec![3; 1024]);
    let cat = ConcatDevice::new(vec![a, b, c]).unwrap();
    assert_eq!(cat.virtual_size(), 9216);
    let dst = raw(vec![9; 9216]);
    convert(
        &cat,
        dst.as_ref(),
        &ConvertOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let out = read(dst.as_ref());
    assert!(out[..5120].iter().all(|&x| x == 1));
    assert!(out[5120..8192].iter().all(|&x| x == 0));
    assert!(out[8192..].iter().all(|&x| x == 3));
    assert!(cat.write_at(&[0], 0).is_err());
}

/// A target that takes compressed writes of 4 KiB units and logs them (and the
/// lengths of the calls); unless `multi`, it refuses more than one unit per call, as
/// qcow2 does.
#[derive(Debug)]
struct Compressing {
    inner: Arc<dyn BlockDevice>,
    units: Mutex<Vec<u64>>,
    calls: Mutex<Vec<usize>>,
    multi: bool,
}

impl BlockDevice for Compressing {
    forward_device!(inner: info, read_at, write_at, flush, map);
    fn compressed_write_granularity(&self) -> Option<u64> {
        Some(4096)
    }
    fn write_compressed(&self, buf: &[u8], off: u64) -> Result<()> {
        // Whole units, the last of them possibly the device's partial last one.
        let end = off + buf.len() as u64;
        assert!(buf.len().is_multiple_of(4096) || end == self.virtual_size());
        assert_eq!(off % 4096, 0);
        if !self.multi && buf.len() > 4096 {
            return Err(Error::invalid("one cluster per call"));
        }
        self.calls.lock().unwrap().push(buf.len());
        for i in 0..(buf.len() as u64).div_ceil(4096) {
            self.units.lock().unwrap().push(off + i * 4096);
        }
        self.inner.write_at(buf, off)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn compression_in_whole_units() {
    // A partial tail unit of one sector (raw sizes are whole sectors).
    let mut s = vec![0u8; 8 * 4096 + 512];
    s[10] = 1; // unit 0
    s[3 * 4096 + 5] = 2; // units 3..=5
    s[4 * 4096 + 5] = 2;
    s[5 * 4096 + 5] = 2;
    s[8 * 4096 + 50] = 3; // partial tail
    let src = raw(s.clone());
    let singles = vec![512, 4096, 4096, 4096, 4096];
    for (workers, chunk, multi, calls) in [
        (1, 4096, true, singles.clone()),
        (3, 4096, false, singles.clone()),
        // Whole chunks: one call for unit 0, one for the run 3..=5, one for the tail.
        (1, 1 << 20, true, vec![512, 4096, 3 * 4096]),
        (2, 8192, true, vec![512, 4096, 4096, 8192]),
        // The device refuses runs: convert falls back to single units.
        (1, 1 << 20, false, singles.clone()),
    ] {
        let dst = Compressing {
            inner: raw(vec![0; s.len()]),
            units: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            multi,
        };
        let opts = ConvertOptions {
            compress: true,
            target_is_zero: true,
            workers,
            chunk_size: chunk,
            ..ConvertOptions::default()
        };
        let st = convert(src.as_ref(), &dst, &opts, &mut |_, _| {}).unwrap();
        let mut units = dst.units.lock().unwrap().clone();
        units.sort_unstable();
        assert_eq!(units, vec![0, 3 * 4096, 4 * 4096, 5 * 4096, 8 * 4096]);
        let mut got = dst.calls.lock().unwrap().clone();
        got.sort_unstable();
        assert_eq!(got, calls, "workers {workers} chunk {chunk} multi {multi}");
        assert_eq!(st.compressed_bytes, 4 * 4096 + 512);
        assert_eq!(st.data_bytes, 0);
        assert_eq!(read(&dst), s);
    }
    // In a larger target the source's partial tail is not a whole unit of the target:
    // it is written plainly.
    let dst = Compressing {
        inner: raw(vec![0; s.len() + 4096]),
        units: Mutex::new(Vec::new()),
        calls: Mutex::new(Vec::new()),
        multi: true,
    };
    let opts = ConvertOptions {
        compress: true,
        target_is_zero: true,
        ..ConvertOptions::default()
    };
    let st = convert(src.as_ref(), &dst, &opts, &mut |_, _| {}).unwrap();
    assert_eq!((st.compressed_bytes, st.data_bytes), (4 * 4096, 512));
    assert_eq!(read(&dst)[..s.len()], s[..]);
    // A target without compression support is refused.
    let dst = raw(vec![0; s.len()]);
    let opts = ConvertOptions {
        compress: true,
        ..ConvertOptions::default()
    };
    assert!(convert(src.as_ref(), dst.as_ref(), &opts, &mut |_, _| {}).is_err());
}

/// A device that fails reads at or after `bad`, and records its writes (offset, length).
#[derive(Debug)]
pub(crate) struct Probe {
    pub(crate) inner: Arc<dyn BlockDevice>,
    pub(crate) bad: u64,
    pub(crate) writes: Mutex<Vec<(u64, u64)>>,
}

impl BlockDevice for Probe {
    forward_device!(inner: info, flush, map);
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        if off + buf.len() as u64 > self.bad {
            return Err(diskimg_blockio::Error::invalid("injected read error"));
        }
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.writes.lock().unwrap().push((off, buf.len() as u64));
        self.inner.write_at(buf, off)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn probe(bytes: Vec<u8>, bad: u64) -> Probe {
    Probe {
        inner: raw(bytes),
        bad,
        writes: Mutex::new(Vec::new()),
    }
}

#[test]
fn ordered_parallel_writes_stay_in_order() {
    let src = raw((0..1u32 << 20).map(|i| (i % 253) as u8 | 1).collect());
    for (workers, ooo) in [(1, false), (4, false), (4, true)] {
        let dst = probe(vec![0; 1 << 20], u64::MAX);
        let opts = ConvertOptions {
            workers,
            out_of_order: ooo,
            chunk_size: 4096,
            ..ConvertOptions::default()
        };
        convert(src.as_ref(), &dst, &opts, &mut |_, _| {}).unwrap();
        let w: Vec<u64> = dst.writes.lock().unwrap().iter().map(|w| w.0).collect();
        assert_eq!(w.len(), 256);
        if !ooo {
            assert!(w.windows(2).all(|p| p[0] < p[1]), "{workers}: out of order");
        }
        assert_eq!(read(&dst), read(src.as_ref()));
    }
}

#[test]
fn read_errors_stop_every_mode() {
    for (workers, ooo) in [(1, false), (3, false), (3, true)] {
        let src = probe(vec![1; 1 << 20], 600_000);
        let dst = raw(vec![0; 1 << 20]);
        let opts = ConvertOptions {
            workers,
            out_of_order: ooo,
            chunk_size: 4096,
            ..ConvertOptions::default()
        };
        let err = convert(&src, dst.as_ref(), &opts, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
    }
}

/// A target that compresses ahead ([`BlockDevice::compress_units`]): records which
/// thread compressed and in which order the units were stored.
#[derive(Debug)]
struct Precompressing {
    inner: Arc<dyn BlockDevice>,
    compressed_on: Mutex<Vec<std::thread::ThreadId>>,
    stored: Mutex<Vec<u64>>,
}

impl BlockDevice for Precompressing {
    forward_device!(inner: info, read_at, write_at, flush, map);
    fn compressed_write_granularity(&self) -> Option<u64> {
        Some(4096)
    }
    fn write_compressed(&self, _buf: &[u8], _off: u64) -> Result<()> {
        panic!("convert must use compress_units when the target has it");
    }
    fn compress_units(&self, buf: &[u8], off: u64) -> Result<CompressedUnits> {
        self.compressed_on
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        // "Compression": the bytes reversed, so a store without compression shows.
        let units = buf
            .chunks(4096)
            .map(|c| PackedUnit::Compressed(c.iter().rev().copied().collect()))
            .collect();
        Ok(CompressedUnits {
            offset: off,
            len: buf.len() as u64,
            units,
        })
    }
    fn write_compressed_units(&self, cu: CompressedUnits) -> Result<()> {
        for ((off, _), u) in cu.unit_ranges(4096)?.into_iter().zip(cu.units) {
            let PackedUnit::Compressed(b) = u else {
                panic!("plain unit");
            };
            let plain: Vec<u8> = b.into_iter().rev().collect();
            self.stored.lock().unwrap().push(off);
            self.inner.write_at(&plain, off)?;
        }
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn workers_compress_and_the_writer_stores_in_order() {
    let n = 256 * 4096;
    let s: Vec<u8> = (0..n).map(|i| (i % 251) as u8 | 1).collect();
    let src = raw(s.clone());
    for (workers, out_of_order) in [(1, false), (4, false), (4, true)] {
        let dst = Precompressing {
            inner: raw(vec![0; n]),
            compressed_on: Mutex::new(Vec::new()),
            stored: Mutex::new(Vec::new()),
        };
        let opts = ConvertOptions {
            compress: true,
            target_is_zero: true,
            workers,
            out_of_order,
            chunk_size: 16 * 4096,
            ..ConvertOptions::default()
        };
        let st = convert(src.as_ref(), &dst, &opts, &mut |_, _| {}).unwrap();
        assert_eq!(st.compressed_bytes, n as u64);
        assert_eq!(read(&dst), s);
        let stored = dst.stored.lock().unwrap().clone();
        assert_eq!(stored.len(), 256);
        if !out_of_order {
            // Guest order, whichever worker finished first.
            assert!(stored.windows(2).all(|w| w[0] < w[1]), "{workers}");
        }
        let on = dst.compressed_on.lock().unwrap().clone();
        let me = std::thread::current().id();
        // With workers, compression happens on them, not on the writer (this thread).
        assert_eq!(on.contains(&me), workers == 1, "{workers}");
    }
}

/// A storage that records which threads wrote to it.
#[derive(Debug, Default)]
struct ThreadLog {
    mem: MemStorage,
    writers: Mutex<Vec<std::thread::ThreadId>>,
}

impl Storage for ThreadLog {
    forward_storage!(mem: read_exact_at, len, set_len);
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writers
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        self.mem.write_all_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[test]
fn raw_targets_are_written_by_the_workers() {
    // A raw image's layout does not depend on the order of writes: the workers write it
    // themselves (several writes in flight) even without -W; other targets stay in order
    // (`ordered_parallel_writes_stay_in_order`).
    let src = raw((0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect());
    let log = Arc::new(ThreadLog::default());
    log.set_len(1 << 20).unwrap();
    let dst = RawDevice::new(log.clone(), false).unwrap();
    assert!(dst.fixed_layout());
    let opts = ConvertOptions {
        workers: 4,
        chunk_size: 4096,
        ..ConvertOptions::default()
    };
    convert(src.as_ref(), &dst, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(read(&dst), read(src.as_ref()));
    let writers = log.writers.lock().unwrap().clone();
    assert_eq!(writers.len(), 256);
    let me = std::thread::current().id();
    assert!(writers.iter().all(|t| *t != me), "the calling thread wrote");
    // One worker: the calling thread copies.
    let log1 = Arc::new(ThreadLog::default());
    log1.set_len(1 << 20).unwrap();
    let dst1 = RawDevice::new(log1.clone(), false).unwrap();
    let opts1 = ConvertOptions {
        workers: 1,
        chunk_size: 4096,
        ..ConvertOptions::default()
    };
    convert(src.as_ref(), &dst1, &opts1, &mut |_, _| {}).unwrap();
    assert!(log1.writers.lock().unwrap().iter().all(|t| *t == me));
    assert!(ConvertOptions::default().workers >= 1);
}
