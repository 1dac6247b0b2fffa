//! `write_from` (copy offloading) against `write_at`: twin images get the same random
//! operation sequences, one writing buffers, the other copying the same bytes from a
//! source storage; both must read back as the model and check clean.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, FileStorage, MemStorage, OpenOptions, OptionList, Storage,
    ZeroFlags,
};
use diskimg_qcow2::{DRIVER, Qcow2Device};
use diskimg_testutil::{Model, read_all, tempdir};
use proptest::prelude::*;

const SIZE: u64 = (640 << 10) + 512;

#[derive(Clone, Debug)]
enum Op {
    /// Write (offset, len, seed); the source copy starts at `seed * 7 % 4096`.
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    /// Compressed write of the cluster with this index (modulo the cluster count).
    Compress(u64),
    Snapshot,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(300_000)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((o, l), b)| Op::Write(o, l, b)),
        1 => (range, any::<bool>()).prop_map(|((o, l), u)| Op::Zero(o, l, u)),
        1 => any::<u64>().prop_map(Op::Compress),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Reopen),
    ]
}

/// A twin: how to (re)open it.
type Open = Box<dyn Fn() -> Arc<dyn BlockDevice>>;

fn mem_twin(options: &str) -> Open {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::parse(options).unwrap());
    DRIVER.create(s.clone(), &mut req).unwrap();
    Box::new(move || DRIVER.open(s.clone(), &OpenOptions::new()).unwrap())
}

fn file_twin(dir: &std::path::Path, name: &str, options: &str) -> Open {
    let path = dir.join(name);
    let data = dir.join(format!("{name}.data"));
    let options = options.replace("DATA", data.to_str().unwrap());
    crate::create(&path, SIZE, &options).unwrap();
    Box::new(move || crate::open(&path, false))
}

fn run(a: &Open, b: &Open, src: &dyn Storage, ops: &[Op]) {
    let (mut da, mut db) = (a(), b());
    let cs = da.info().cluster_size.unwrap();
    let mut m = Model::zeroed(SIZE as usize);
    let mut snapshots = 0;
    for op in ops {
        match *op {
            Op::Write(o, l, seed) => {
                let d: Vec<u8> = (0..l).map(|i| seed.wrapping_add((i / 3) as u8)).collect();
                let at = u64::from(seed) * 7 % 4096;
                src.write_all_at(&d, at).unwrap();
                da.write_at(&d, o).unwrap();
                db.write_from(o, l, src, at).unwrap();
                m.write(o as usize, &d);
            }
            Op::Zero(o, l, u) => {
                for d in [&da, &db] {
                    d.write_zeroes(o, l, ZeroFlags { may_unmap: u }).unwrap();
                }
                m.zero(o as usize, l as usize);
            }
            Op::Compress(k) => {
                let off = k % SIZE.div_ceil(cs) * cs;
                let len = cs.min(SIZE - off);
                let d: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
                let ra = da.write_compressed(&d, off);
                let rb = db.write_compressed(&d, off);
                assert_eq!(ra.is_ok(), rb.is_ok(), "{ra:?} {rb:?}");
                if ra.is_ok() {
                    m.write(off as usize, &d);
                }
            }
            Op::Snapshot => {
                // At most two: a snapshot that overflows narrow refcounts fails and leaks
                // (a separate issue from write_from, seen with refcount_bits=2).
                snapshots += 1;
                if snapshots > 2 {
                    continue;
                }
                for d in [&da, &db] {
                    if let Some(q) = d.as_any().downcast_ref::<Qcow2Device>() {
                        // Refused with a data file: then neither twin has one.
                        let _ = q.create_snapshot("s");
                    }
                }
            }
            Op::Reopen => {
                da.flush().unwrap();
                db.flush().unwrap();
                drop((da, db));
                (da, db) = (a(), b());
            }
        }
    }
    assert!(read_all(da.as_ref()) == m.bytes, "write_at differs");
    assert!(read_all(db.as_ref()) == m.bytes, "write_from differs");
    for d in [&da, &db] {
        let r = d.check(Default::default()).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    }
}

fn mem(options: &str, ops: &[Op]) {
    let src = MemStorage::new();
    run(&mem_twin(options), &mem_twin(options), &src, ops);
}

fn files(options: &str, ops: &[Op]) {
    let dir = tempdir();
    let src = FileStorage::create(dir.path().join("src")).unwrap();
    let a = file_twin(dir.path(), "a.qcow2", options);
    let b = file_twin(dir.path(), "b.qcow2", options);
    run(&a, &b, &src, ops);
    for n in ["a.qcow2", "b.qcow2"] {
        diskimg_testutil::assert_qemu_check_clean(&dir.path().join(n), "qcow2");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn mem_4k(ops in proptest::collection::vec(op(), 1..20)) {
        mem("cluster_size=4k", &ops);
    }
    #[test]
    fn mem_v2_512(ops in proptest::collection::vec(op(), 1..20)) {
        mem("compat=0.10,cluster_size=512", &ops);
    }
    #[test]
    fn mem_1k_narrow_refcounts(ops in proptest::collection::vec(op(), 1..20)) {
        mem("cluster_size=1k,refcount_bits=4", &ops);
    }
    #[test]
    fn mem_extended_l2(ops in proptest::collection::vec(op(), 1..20)) {
        mem("extended_l2=on,cluster_size=32k", &ops);
    }
    #[test]
    fn files_64k(ops in proptest::collection::vec(op(), 1..12)) {
        files("cluster_size=64k", &ops);
    }
    #[test]
    fn files_data_file(ops in proptest::collection::vec(op(), 1..12)) {
        files("cluster_size=4k,data_file=DATA", &ops);
    }
}

/// Regression-style fixed sequence: in-place overwrite, zero-flagged (preallocated)
/// clusters, shared clusters after a snapshot, compressed clusters overwritten.
#[test]
fn fixed_sequence_on_files() {
    let ops = [
        Op::Write(0, 300_000, 1),
        Op::Write(65536, 131072, 2),
        Op::Zero(0, 131072, false),
        Op::Write(0, 200_000, 3),
        Op::Snapshot,
        Op::Write(4096, 262144, 4),
        Op::Compress(9),
        Op::Write(9 * 65536 - 100, 65536 + 200, 5),
        Op::Reopen,
        Op::Write(SIZE - 70_000, 70_000, 6),
    ];
    files("cluster_size=64k", &ops);
    files("cluster_size=512", &ops);
    mem("extended_l2=on,cluster_size=16k", &ops);
}

/// Crash consistency of `write_from`: cut the image's storage at every write and flush of
/// a workload; the image must check without corruption and flushed data must read back.
#[test]
fn crash_at_every_cut_keeps_the_image_consistent() {
    use diskimg_blockio::{CrashMode, FaultStorage};
    const N: u64 = 1 << 20;
    // (offset, len, kind): 0 = write_from, 1 = zero keeping allocation, 2 = compressed.
    let work: [(u64, u64, u8); 7] = [
        (0, 200_000, 0),
        (65536, 65536, 1),
        (16384, 131072, 0),
        (327_680, 0, 2),
        (300_000, 100_000, 0),
        (5000, 70_000, 0),
        (N - 50_000, 50_000, 0),
    ];
    let src = MemStorage::from_vec((0..N as usize + 64).map(|i| (i / 3) as u8 | 1).collect());
    // Runs the workload (a flush after each operation) until the storage fails; returns
    // the model of what was flushed and the index of the operation cut short.
    let run = |fs: &Arc<FaultStorage>| -> (Model, usize) {
        let dev = DRIVER.open(fs.clone(), &OpenOptions::new()).unwrap();
        let mut m = Model::zeroed(N as usize);
        let g = dev.compressed_write_granularity().unwrap();
        for (k, &(o, l, kind)) in work.iter().enumerate() {
            // Compressed writes take one cluster.
            let l = if kind == 2 { g } else { l };
            let r = match kind {
                0 => dev.write_from(o, l, &src, o + 7),
                1 => dev.write_zeroes(o, l, ZeroFlags { may_unmap: false }),
                _ => dev.write_compressed(&vec![9u8; l as usize], o),
            };
            if r.is_err() || dev.flush().is_err() {
                return (m, k);
            }
            match kind {
                0 => {
                    let mut b = vec![0u8; l as usize];
                    src.read_exact_at(&mut b, o + 7).unwrap();
                    m.write(o as usize, &b);
                }
                1 => m.zero(o as usize, l as usize),
                _ => m.write(o as usize, &vec![9u8; l as usize]),
            }
        }
        (m, work.len())
    };
    for options in ["cluster_size=4k", "cluster_size=16k,extended_l2=on"] {
        let base: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let mut req = CreateRequest::new(N, OptionList::parse(options).unwrap());
        DRIVER.create(base.clone(), &mut req).unwrap();
        let mut initial = vec![0u8; base.len().unwrap() as usize];
        base.read_exact_at(&mut initial, 0).unwrap();
        let clean = Arc::new(FaultStorage::new(initial.clone(), None));
        let (full, done) = run(&clean);
        assert_eq!(done, work.len());
        let count = clean.ops();
        assert!(count > 10, "{count}");
        let s: Arc<dyn Storage> =
            Arc::new(MemStorage::from_vec(clean.crash_image(CrashMode::KeepAll)));
        let dev = DRIVER.open(s, &OpenOptions::new()).unwrap();
        assert!(read_all(dev.as_ref()) == full.bytes, "{options}: clean run");
        for cut in 0..count {
            let fs = Arc::new(FaultStorage::new(initial.clone(), Some(cut)));
            let (durable, k) = run(&fs);
            assert!(fs.crashed());
            let modes = [
                CrashMode::KeepAll,
                CrashMode::DropUnflushed,
                CrashMode::Random(cut),
            ];
            for mode in modes {
                let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fs.crash_image(mode)));
                let dev = DRIVER.open(s, &OpenOptions::new().read_only(true)).unwrap();
                let r = dev.check(Default::default()).unwrap();
                assert_eq!(
                    (r.corruptions, r.check_errors),
                    (0, 0),
                    "{options} cut {cut}: {r:?}"
                );
                // Everything flushed reads back; the operation cut short may or may not
                // have landed (whole clusters around it are masked).
                let mut got = read_all(dev.as_ref());
                let mut want = durable.bytes.clone();
                if let Some(&(o, l, kind)) = work.get(k) {
                    let l = if kind == 2 { 16384 } else { l };
                    let a = (o / 16384 * 16384) as usize;
                    let b = ((o + l).div_ceil(16384) * 16384).min(N) as usize;
                    want[a..b].fill(0);
                    got[a..b].fill(0);
                }
                assert!(
                    got == want,
                    "{options} cut {cut} {mode:?}: flushed data lost"
                );
            }
        }
    }
}
