//! The host epoch (`BlockDevice::host_epoch`): a detached reader takes it, walks a range
//! (`walk_runs`), and reads the host runs later; if the epoch did not move meanwhile,
//! the bytes there must still be the guest data the walk mapped, or what an operation
//! since then wrote into that same guest range. A model test of random operations
//! between the walk and the late read, and direct tests of what moves it and what not.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, Mapping, MemStorage, OpenOptions, OptionList, Storage,
    ZeroFlags,
};
use diskimg_qcow2::DRIVER;
use diskimg_raw::RawDevice;
use diskimg_testutil::{Model, read_all};
use proptest::prelude::*;

const SIZE: u64 = 256 << 10;

/// One operation between a walk and the late read of its runs.
#[derive(Clone, Debug)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    /// A compressed write of whole cluster `n` (modulo the cluster count).
    Compressed(u64, u8),
    Flush,
    SnapCreate,
    SnapDeleteOldest,
    SnapApplyNewest,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(40_000)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((o, l), b)| Op::Write(o, l, b)),
        2 => (range.clone(), any::<bool>()).prop_map(|((o, l), u)| Op::Zero(o, l, u)),
        3 => range.prop_map(|(o, l)| Op::Discard(o, l)),
        1 => (0..64u64, any::<u8>()).prop_map(|(n, b)| Op::Compressed(n, b)),
        1 => Just(Op::Flush),
        1 => Just(Op::SnapCreate),
        1 => Just(Op::SnapDeleteOldest),
        1 => Just(Op::SnapApplyNewest),
    ]
}

/// A step: the range walked, then the operations before the late read.
fn step() -> impl Strategy<Value = ((u64, u64), Vec<Op>)> {
    let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(100_000)));
    (range, proptest::collection::vec(op(), 1..4))
}

/// A host run the walk reported: guest offset, length, host offset in the image file.
type Run = (u64, u64, u64);

/// Walks `off..off+len` and returns the host runs (all in the image file here).
fn walk(dev: &dyn BlockDevice, off: u64, len: u64) -> Vec<Run> {
    let mut runs = Vec::new();
    let walked = dev
        .walk_runs(off, len, &mut |_, pos, n, m| {
            if let Mapping::Host(h) = m {
                runs.push((pos, n, h.offset));
            }
            Ok(())
        })
        .unwrap();
    assert!(walked, "qcow2 on memory storage walks");
    runs
}

/// Host bytes `off..off+len` of `s`, zeroes past its end (as the walk's runs read).
fn host_bytes(s: &dyn Storage, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    let end = s.len().unwrap();
    let n = end.saturating_sub(off).min(len) as usize;
    if n > 0 {
        s.read_exact_at(&mut buf[..n], off).unwrap();
    }
    buf
}

/// The device, its image file, the model, and the models of its snapshots.
struct World {
    s: Arc<dyn Storage>,
    dev: Arc<dyn BlockDevice>,
    m: Model,
    snaps: Vec<(String, Model)>,
    /// Snapshots created so far (their names stay unique).
    created: usize,
    cs: u64,
}

impl World {
    fn new(options: &str, oo: OpenOptions) -> Self {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let mut req = CreateRequest::new(SIZE, OptionList::parse(options).unwrap());
        DRIVER.create(s.clone(), &mut req).unwrap();
        let dev = DRIVER.open(s.clone(), &oo).unwrap();
        let cs = dev.info().cluster_size.unwrap();
        Self {
            s,
            dev,
            m: Model::zeroed(SIZE as usize),
            snaps: Vec::new(),
            created: 0,
            cs,
        }
    }

    /// Applies `op` to the device and the model; returns the guest range it changed.
    fn apply(&mut self, op: &Op) -> Option<(u64, u64)> {
        let dev = self.dev.clone();
        let snaps = dev.as_snapshots().unwrap();
        match *op {
            Op::Write(o, l, b) => {
                let d: Vec<u8> = (0..l).map(|i| b.wrapping_add(i as u8)).collect();
                dev.write_at(&d, o).unwrap();
                self.m.write(o as usize, &d);
                Some((o, l))
            }
            Op::Zero(o, l, u) => {
                dev.write_zeroes(o, l, ZeroFlags { may_unmap: u }).unwrap();
                self.m.zero(o as usize, l as usize);
                Some((o, l))
            }
            Op::Discard(o, l) => {
                dev.discard(o, l).unwrap();
                let start = o.div_ceil(self.cs) * self.cs;
                let end = if o + l == SIZE {
                    SIZE
                } else {
                    (o + l) / self.cs * self.cs
                };
                if start < end {
                    self.m.zero(start as usize, (end - start) as usize);
                }
                Some((o, l))
            }
            Op::Compressed(n, b) => {
                let o = n % (SIZE / self.cs) * self.cs;
                let d: Vec<u8> = (0..self.cs).map(|i| b ^ (i as u8 / 7)).collect();
                // Only into clusters never written (as `convert -c`): else refused.
                if dev.write_compressed(&d, o).is_ok() {
                    self.m.write(o as usize, &d);
                }
                Some((o, self.cs))
            }
            Op::Flush => {
                dev.flush().unwrap();
                None
            }
            Op::SnapCreate => {
                self.created += 1;
                let name = format!("s{}", self.created);
                snaps.create(&name).unwrap();
                self.snaps.push((name, self.m.clone()));
                None
            }
            Op::SnapDeleteOldest => {
                if !self.snaps.is_empty() {
                    let (name, _) = self.snaps.remove(0);
                    snaps.delete(&name).unwrap();
                }
                None
            }
            Op::SnapApplyNewest => {
                let (name, m) = self.snaps.last()?.clone();
                snaps.apply(&name).unwrap();
                self.m = m;
                Some((0, SIZE))
            }
        }
    }

    /// One step: epoch, walk, `ops`, then the late read of the runs when the epoch
    /// stayed. Returns whether it stayed.
    fn step(&mut self, (off, len): (u64, u64), ops: &[Op]) -> bool {
        let e = self.dev.host_epoch().expect("qcow2 answers its host epoch");
        let runs = walk(self.dev.as_ref(), off, len);
        // Each byte may read as before, or as any operation since left it.
        let mut allowed: Vec<Model> = vec![self.m.clone()];
        let mut touched: Vec<Option<(u64, u64)>> = vec![None];
        for (g, n, h) in &runs {
            let now = host_bytes(self.s.as_ref(), *h, *n);
            assert!(
                now[..] == self.m.bytes[*g as usize..(*g + *n) as usize],
                "the walk maps guest {g:#x} to host {h:#x}, which holds other data"
            );
        }
        for op in ops {
            touched.push(self.apply(op));
            allowed.push(self.m.clone());
        }
        if self.dev.host_epoch() != Some(e) {
            return false;
        }
        for (g, n, h) in runs {
            let now = host_bytes(self.s.as_ref(), h, n);
            for (i, &b) in now.iter().enumerate() {
                let at = g + i as u64;
                let ok = allowed.iter().zip(&touched).enumerate().any(|(k, (m, t))| {
                    let hit = k == 0 || t.is_some_and(|(o, l)| o <= at && at < o + l);
                    hit && m.bytes[at as usize] == b
                });
                assert!(
                    ok,
                    "epoch {e} unchanged, but host {:#x} (guest {at:#x}, walked) now holds \
                     {b:#x}: after {ops:?}",
                    h + i as u64
                );
            }
        }
        true
    }

    fn finish(&self) {
        assert!(
            read_all(self.dev.as_ref()) == self.m.bytes,
            "content differs"
        );
        let r = self.dev.check(Default::default()).unwrap();
        assert_eq!((r.corruptions, r.check_errors), (0, 0), "{r:?}");
    }
}

fn run(options: &str, steps: &[((u64, u64), Vec<Op>)]) {
    run_with(options, steps, OpenOptions::new());
}

/// [`run`] opening with `oo` (tiny cache limits).
fn run_with(options: &str, steps: &[((u64, u64), Vec<Op>)], oo: OpenOptions) {
    let mut w = World::new(options, oo);
    for (range, ops) in steps {
        w.step(*range, ops);
    }
    w.finish();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn late_reads_v3_4k(steps in proptest::collection::vec(step(), 1..12)) {
        run("cluster_size=4k", &steps);
    }
    #[test]
    fn late_reads_512_refcount_bits_4(steps in proptest::collection::vec(step(), 1..12)) {
        run("cluster_size=512,refcount_bits=4", &steps);
    }
    #[test]
    fn late_reads_lazy_tiny_cache(steps in proptest::collection::vec(step(), 1..12)) {
        // Two cached L2 tables of 512 bytes: evictions and deferred-update commits.
        let mut limits = diskimg_blockio::Limits::default();
        limits.max_cache_bytes = 1024;
        let oo = OpenOptions::new().limits(limits);
        run_with("cluster_size=512,lazy_refcounts=on", &steps, oo);
    }
    #[test]
    fn late_reads_extended_l2(steps in proptest::collection::vec(step(), 1..12)) {
        run("extended_l2=on,cluster_size=16k", &steps);
    }
}

/// The host offset guest `off` maps to (a host run).
fn host_of(dev: &dyn BlockDevice, off: u64) -> u64 {
    let runs = walk(dev, off, 1);
    assert_eq!(runs.len(), 1, "guest {off:#x} is not a host run");
    runs[0].2
}

#[test]
fn discard_then_reuse_moves_it_writes_do_not() {
    let mut w = World::new("cluster_size=16k", OpenOptions::new());
    let cs = w.cs;
    w.apply(&Op::Write(0, cs, 1));
    w.apply(&Op::Write(cs, cs, 2));
    let e = w.dev.host_epoch().unwrap();
    // In place (whole, partial), allocating writes into fresh clusters, flushes between
    // them (the write reserve fills and is used), reads: the epoch stays.
    w.apply(&Op::Write(100, 5000, 3));
    w.apply(&Op::Write(0, cs, 4));
    for k in 2..6 {
        w.apply(&Op::Write(k * cs + 512, 4096, k as u8));
        w.apply(&Op::Flush);
    }
    w.apply(&Op::Write(cs / 2, 3 * cs, 9));
    read_all(w.dev.as_ref());
    assert_eq!(
        w.dev.host_epoch(),
        Some(e),
        "writes and reads moved the epoch"
    );
    // Discarding guest cluster 0 frees its host cluster ...
    let h0 = host_of(w.dev.as_ref(), 0);
    w.apply(&Op::Discard(0, cs));
    let e1 = w.dev.host_epoch().unwrap();
    assert_ne!(e1, e, "a discard freed a cluster: the epoch must move");
    // ... which the next allocation takes for other guest data.
    w.apply(&Op::Write(10 * cs, cs, 7));
    w.apply(&Op::Write(11 * cs, cs, 8));
    let fresh = (10..12).map(|k| host_of(w.dev.as_ref(), k * cs));
    assert!(
        fresh.clone().any(|h| h == h0),
        "the freed cluster {h0:#x} was not reused: {:?}",
        fresh.collect::<Vec<_>>()
    );
    w.finish();
}

#[test]
fn repair_and_snapshot_revert_move_it() {
    let mut w = World::new("cluster_size=4k", OpenOptions::new());
    w.apply(&Op::Write(0, 64 << 10, 1));
    w.apply(&Op::SnapCreate);
    w.apply(&Op::Write(0, 64 << 10, 2));
    let e = w.dev.host_epoch().unwrap();
    // Reverting frees the active clusters written since the snapshot.
    w.apply(&Op::SnapApplyNewest);
    let e1 = w.dev.host_epoch().unwrap();
    assert_ne!(e1, e, "reverting to a snapshot freed clusters");
    // A repair that rebuilds the refcount structures (a refcount block is lost).
    w.dev.flush().unwrap();
    let dev = DRIVER.open(w.s.clone(), &OpenOptions::new()).unwrap();
    drop(std::mem::replace(&mut w.dev, dev));
    let h = w.s.len().unwrap();
    let reft = {
        let mut b = [0u8; 8];
        w.s.read_exact_at(&mut b, 48).unwrap();
        u64::from_be_bytes(b)
    };
    assert!(reft < h);
    w.s.write_all_at(&[0u8; 8], reft).unwrap();
    let dev = DRIVER
        .open(w.s.clone(), &OpenOptions::new())
        .unwrap_or_else(|e| panic!("open after losing a refcount block: {e}"));
    drop(std::mem::replace(&mut w.dev, dev));
    let e3 = w.dev.host_epoch().unwrap();
    w.dev.check(diskimg_blockio::RepairMode::All).unwrap();
    assert_ne!(
        w.dev.host_epoch().unwrap(),
        e3,
        "a rebuild must move the epoch"
    );
    w.finish();
}

#[test]
fn backing_and_snapshot_views_answer() {
    let base_s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![5u8; SIZE as usize]));
    let base: Arc<dyn BlockDevice> = Arc::new(RawDevice::new(base_s, false).unwrap());
    let w = World::new("cluster_size=4k", OpenOptions::new());
    let e = w.dev.host_epoch().unwrap();
    w.dev.set_backing(Some(base.clone())).unwrap();
    let e1 = w.dev.host_epoch().expect("raw backing answers");
    assert_ne!(e1, e, "a new backing device must move the epoch");
    // A backing device that cannot tell: neither can the image.
    w.dev
        .set_backing(Some(Arc::new(NoEpoch(base.clone()))))
        .unwrap();
    assert_eq!(w.dev.host_epoch(), None);
    w.dev.set_backing(None).unwrap();
    let e2 = w.dev.host_epoch().unwrap();
    assert!(e2 > e1, "the count only grows: {e1} then {e2}");
    // A snapshot view shares the image's count: deleting the snapshot moves it.
    let snaps = w.dev.as_snapshots().unwrap();
    w.dev.write_at(&[1u8; 8192], 0).unwrap();
    snaps.create("a").unwrap();
    w.dev.write_at(&[2u8; 8192], 0).unwrap();
    let view = snaps.open("a").unwrap();
    let v = view.host_epoch().unwrap();
    // A view made over a backing device asks it too.
    w.dev.set_backing(Some(Arc::new(NoEpoch(base)))).unwrap();
    assert_eq!(snaps.open("a").unwrap().host_epoch(), None);
    snaps.delete("a").unwrap();
    assert_ne!(
        view.host_epoch().unwrap(),
        v,
        "the view's clusters were freed"
    );
}

/// A device that forwards everything but its host epoch.
#[derive(Debug)]
struct NoEpoch(Arc<dyn BlockDevice>);

impl BlockDevice for NoEpoch {
    diskimg_blockio::forward_device!(0: all except host_epoch);
}

#[test]
fn read_only_opens_answer() {
    let w = World::new("cluster_size=4k", OpenOptions::new());
    w.dev.write_at(&[3u8; 4096], 0).unwrap();
    w.dev.flush().unwrap();
    let ro = DRIVER
        .open(w.s.clone(), &OpenOptions::new().read_only(true))
        .unwrap();
    assert!(ro.host_epoch().is_some());
}

#[test]
fn make_empty_moves_it() {
    // Emptied from scratch (v3, no snapshots): no refcount is set to 0 on the way, the
    // structures are rewritten; then the other way (with a snapshot): clusters freed.
    for snapshot in [false, true] {
        let mut w = World::new("cluster_size=4k", OpenOptions::new());
        w.apply(&Op::Write(0, 64 << 10, 1));
        if snapshot {
            w.apply(&Op::SnapCreate);
            w.apply(&Op::Write(0, 16 << 10, 2));
        }
        let e = w.dev.host_epoch().unwrap();
        let q = w.dev.as_any().downcast_ref::<diskimg_qcow2::Qcow2Device>();
        q.unwrap().make_empty().unwrap();
        assert_ne!(w.dev.host_epoch().unwrap(), e, "snapshot: {snapshot}");
        w.m = Model::zeroed(SIZE as usize);
        w.apply(&Op::Write(8192, 20000, 3));
        w.finish();
    }
}
