//! Crash consistency of two threads allocating on one device, each flushing after a few
//! of its own writes (issue 17: a multi-queue VMM writing fresh clusters). A guest
//! flush drops the metadata lock during its storage flush, so the other thread allocates
//! meanwhile, from reserve clusters whose refcounts that flush is still making durable
//! (`engine/reserve.rs`). The storage is cut at every operation of such a run (each run
//! its own interleaving; a slow flush widens the window); under every crash mode the
//! image must have no corruption, each block must read zeroes or what was written to it,
//! and a block written before a flush of its thread returned must read what was written.

use std::sync::Arc;
use std::time::Duration;

use diskimg_blockio::{
    BlockDevice, CrashMode, Driver, FaultStorage, OpenOptions, Result, Storage, forward_storage,
};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::read_all;

use crate::crash_harness::{Judge, assert_qemu_no_leaks_or_corruptions};

const BLOCK: usize = 4096;
const CLUSTER: u64 = 65536;
/// Writes per thread, and the flush interval of each thread.
const WRITES: u64 = 24;
const EVERY: u64 = 3;

/// Thread `t`'s `k`-th write: a block inside guest cluster `2k + t`, and its byte.
fn op(t: u64, k: u64) -> (u64, u8) {
    let c = 2 * k + t;
    (
        c * CLUSTER + (k * 5 % 16) * BLOCK as u64,
        (1 + t * 100 + k) as u8,
    )
}

/// One thread's writes: (offset, byte, a flush of this thread returned after it).
type Log = Vec<(u64, u8, bool)>;

fn thread_run(dev: &dyn BlockDevice, t: u64) -> Log {
    let mut log: Log = Vec::new();
    for k in 0..WRITES {
        let (off, b) = op(t, k);
        // Recorded first: a failed write may have reached the storage in part.
        log.push((off, b, false));
        if dev.write_at(&[b; BLOCK], off).is_err() {
            return log;
        }
        if (k + 1) % EVERY == 0 {
            if dev.flush().is_err() {
                return log;
            }
            log.iter_mut().for_each(|x| x.2 = true);
        }
    }
    log
}

/// Runs both threads on one device over `initial`, cut at `cut` (or never).
fn run(initial: &[u8], cut: Option<u64>) -> (Arc<FaultStorage>, Log) {
    let fs = Arc::new(FaultStorage::new(initial.to_vec(), cut));
    let s: Arc<dyn Storage> = Arc::new(Baton::new(fs.clone(), true));
    let dev = DRIVER.open(s, &OpenOptions::new()).unwrap();
    let logs: Vec<Log> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|t| {
                let dev = dev.clone();
                sc.spawn(move || thread_run(dev.as_ref(), t))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    if cut.is_none() {
        dev.close().unwrap();
    }
    (fs, logs.concat())
}

fn check_cut(initial: &[u8], cut: u64, judge: &Judge<'_>) -> bool {
    let (fs, log) = run(initial, Some(cut));
    if !fs.crashed() {
        return false;
    }
    judge.images(&fs, cut, |c| {
        let got = read_all(c.dev);
        for (b, g) in got.chunks(BLOCK).enumerate() {
            let off = (b * BLOCK) as u64;
            let ok = match log.iter().find(|x| x.0 == off) {
                Some(&(_, v, true)) => g.iter().all(|&x| x == v),
                Some(&(_, v, false)) => g.iter().all(|&x| x == v) || g.iter().all(|&x| x == 0),
                None => g.iter().all(|&x| x == 0),
            };
            assert!(
                ok,
                "{}: block at {off} holds what no write put there",
                c.what
            );
        }
    });
    true
}

#[test]
fn crash_during_two_threads_allocating_and_flushing() {
    let initial = crate::crash_alloc::image();
    let (fs, log) = run(&initial, None);
    assert_eq!(log.len() as u64, 2 * WRITES);
    let count = fs.ops();
    let dir = diskimg_testutil::tempdir();
    let path = dir.path().join("crash.qcow2");
    // A clean run: every write reads back, no leaks (the reserve went back at close).
    let img = fs.crash_image(CrashMode::DropUnflushed);
    std::fs::write(&path, &img).unwrap();
    assert_qemu_no_leaks_or_corruptions(&path);
    let dev = crate::open(&path, true);
    let got = read_all(dev.as_ref());
    for &(off, b, _) in &log {
        let at = off as usize;
        assert!(got[at..at + BLOCK].iter().all(|&x| x == b), "block {off}");
    }
    drop(dev);
    // Interleavings differ from run to run: a cut past a run's last operation is no cut.
    let judge = Judge::new(&path, 4, CrashMode::DropUnflushed);
    let crashed = (0..count)
        .filter(|&cut| check_cut(&initial, cut, &judge))
        .count();
    assert!(
        crashed as u64 > count / 2,
        "{crashed} of {count} cuts crashed"
    );
}

/// A storage whose flushes take a while when `slow` (so that the other thread runs
/// meanwhile), and that, at the first flush thread `a` makes while `hook` is set, runs
/// the hook (the other thread's work, on its own thread) before flushing:
/// deterministically the window in which a guest flush of `a` has dropped the metadata
/// lock.
struct Baton {
    inner: Arc<FaultStorage>,
    slow: bool,
    a: std::thread::ThreadId,
    hook: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Baton {
    /// Thread `a` is the caller.
    fn new(inner: Arc<FaultStorage>, slow: bool) -> Self {
        Self {
            inner,
            slow,
            a: std::thread::current().id(),
            hook: std::sync::Mutex::new(None),
        }
    }
}

impl std::fmt::Debug for Baton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Baton")
    }
}

impl Storage for Baton {
    forward_storage!(inner: read_exact_at, write_all_at, len, set_len);
    fn flush(&self) -> Result<()> {
        if self.slow {
            std::thread::sleep(Duration::from_micros(300));
        }
        let hook = (std::thread::current().id() == self.a)
            .then(|| self.hook.lock().unwrap().take())
            .flatten();
        if let Some(h) = hook {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                h();
                let _ = tx.send(());
            });
            // Only a flush under the metadata lock could keep the other thread waiting.
            rx.recv_timeout(Duration::from_secs(20))
                .expect("the other thread ran while thread A flushed");
        }
        self.inner.flush()
    }
}

/// Thread A fills the first reserve and flushes; while its storage flush runs (the
/// metadata lock dropped), thread B allocates past the durable part of the grown
/// reserve and flushes. B's L2 entries must not reach the storage before a flush made
/// the new clusters' refcounts durable. Returns the storage and B's blocks.
fn baton_run(initial: &[u8], cut: Option<u64>) -> (Arc<FaultStorage>, Vec<(u64, u8)>) {
    let fs = Arc::new(FaultStorage::new(initial.to_vec(), cut));
    let baton = Arc::new(Baton::new(fs.clone(), false));
    let s: Arc<dyn Storage> = baton.clone();
    let dev = DRIVER.open(s, &OpenOptions::new()).unwrap();
    let b_ops: Vec<(u64, u8)> = (40..43).map(|c| (c * CLUSTER, c as u8)).collect();
    let run_a = || -> Result<()> {
        // A first group (no reserve yet: it allocates one of 16 at the flush), then 15
        // writes from it (one left, fewer than used: the next flush grows it).
        for c in 0..23u64 {
            dev.write_at(&[0xa0; BLOCK], c * CLUSTER)?;
            if c == 7 {
                dev.flush()?;
            }
        }
        let (d, ops) = (dev.clone(), b_ops.clone());
        *baton.hook.lock().unwrap() = Some(Box::new(move || {
            let b = || -> Result<()> {
                for &(off, v) in &ops {
                    d.write_at(&[v; BLOCK], off)?;
                }
                d.flush()
            };
            let _ = b();
        }));
        dev.flush()
    };
    let r = run_a();
    assert!(r.is_ok() || cut.is_some(), "{r:?}");
    (fs, b_ops)
}

#[test]
fn crash_while_another_thread_allocates_during_a_flush() {
    let initial = crate::crash_alloc::image();
    let (fs, b_ops) = baton_run(&initial, None);
    let count = fs.ops();
    // After both flushes every write is durable.
    let img = fs.crash_image(CrashMode::DropUnflushed);
    let s: Arc<dyn Storage> = Arc::new(diskimg_blockio::MemStorage::from_vec(img));
    let dev = DRIVER.open(s, &OpenOptions::new().read_only(true)).unwrap();
    let got = read_all(dev.as_ref());
    for (off, v) in b_ops
        .iter()
        .copied()
        .chain((0..23).map(|c| (c * CLUSTER, 0xa0)))
    {
        let at = off as usize;
        assert!(got[at..at + BLOCK].iter().all(|&x| x == v), "block {off}");
    }
    let ro = OpenOptions::new().read_only(true);
    for cut in 0..count {
        let (fs, _) = baton_run(&initial, Some(cut));
        // Many subsets of the unflushed writes: an L2 entry kept whose cluster's
        // refcount write was lost is what a missing ordering flush leaves.
        for seed in 0..24 {
            let img = fs.crash_image(CrashMode::Random(seed * 7919 + cut));
            let s: Arc<dyn Storage> = Arc::new(diskimg_blockio::MemStorage::from_vec(img));
            let dev = DRIVER.open(s, &ro).unwrap();
            crate::assert_cut_checks_clean(dev.as_ref(), &format!("cut {cut} seed {seed}"));
        }
    }
}
