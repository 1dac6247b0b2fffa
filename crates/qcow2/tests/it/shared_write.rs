//! In-place overwrites run under the shared metadata lock (issues 17/20/21): shown
//! without timing asserts by a storage that holds a guest data write until another one
//! arrives (overwrites of two allocated clusters must meet inside the storage), and that
//! holds an in-place overwrite while an operation changing mappings runs (the operation
//! must not finish before the overwrite did).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use diskimg_blockio::{
    BlockDevice, Driver, MemStorage, OpenOptions, Result, Storage, ZeroFlags, forward_storage,
};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::read_all;

const CS: u64 = 65536;
/// How long a held write waits for company: a bound that only an engine serialising the
/// writes reaches (then the test fails), never a measurement.
const MEET: Duration = Duration::from_secs(20);
/// How long a held overwrite stays inside the storage while an excluded operation runs.
const HOLD: Duration = Duration::from_millis(300);

/// Guest data writes are recognised by their bytes: every byte of the buffer equals
/// one of these markers (metadata never looks like that at these lengths).
const OVERWRITE: u8 = 0xa5;

#[derive(Debug, Default)]
struct Gate {
    /// Held writes currently inside the storage.
    inside: usize,
    /// Held writes that arrived so far.
    arrived: usize,
    /// Held writes that left the hold (still inside the engine's write).
    left: usize,
}

/// A [`MemStorage`] whose data writes of marker bytes can be held (see the tests).
#[derive(Debug)]
struct Held {
    inner: MemStorage,
    armed: AtomicBool,
    /// Wait for a second held write (true) or hold each one for [`HOLD`] (false).
    meet: bool,
    gate: Mutex<Gate>,
    cv: Condvar,
    /// A held write gave up waiting for company.
    lonely: AtomicBool,
}

impl Held {
    fn new(meet: bool) -> Self {
        Self {
            inner: MemStorage::new(),
            armed: AtomicBool::new(false),
            meet,
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
            lonely: AtomicBool::new(false),
        }
    }

    fn hold(&self) {
        let mut g = self.gate.lock().unwrap();
        g.inside += 1;
        g.arrived += 1;
        self.cv.notify_all();
        if self.meet {
            let (g2, t) = self
                .cv
                .wait_timeout_while(g, MEET, |g| g.arrived < 2)
                .unwrap();
            g = g2;
            if t.timed_out() {
                self.lonely.store(true, Ordering::SeqCst);
            }
        } else {
            g = self.cv.wait_timeout_while(g, HOLD, |_| true).unwrap().0;
        }
        g.inside -= 1;
        g.left += 1;
    }

    /// Whether a held write has left its hold.
    fn released(&self) -> bool {
        self.gate.lock().unwrap().left > 0
    }

    /// Waits until a held write is inside the storage.
    fn wait_inside(&self) {
        let g = self.gate.lock().unwrap();
        let (g, t) = self
            .cv
            .wait_timeout_while(g, MEET, |g| g.inside == 0)
            .unwrap();
        assert!(!t.timed_out() && g.inside > 0, "no held write arrived");
    }
}

impl Storage for Held {
    forward_storage!(inner: read_exact_at, len, set_len, flush);
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let marked = buf.len() >= 512 && buf.iter().all(|&b| b == OVERWRITE);
        if marked && self.armed.load(Ordering::SeqCst) {
            self.hold();
        }
        self.inner.write_all_at(buf, offset)
    }
}

/// A 1 MiB image (64 KiB clusters, `options`) on a [`Held`] storage, with clusters 0..4
/// written (allocated, refcount 1) and flushed.
fn image(meet: bool, options: &str) -> (Arc<Held>, Arc<dyn BlockDevice>) {
    let held = Arc::new(Held::new(meet));
    let s: Arc<dyn Storage> = held.clone();
    let mut req = diskimg_blockio::CreateRequest::new(
        1 << 20,
        diskimg_blockio::OptionList::parse(options).unwrap(),
    );
    DRIVER.create(s.clone(), &mut req).unwrap();
    let dev = DRIVER.open(s, &OpenOptions::new()).unwrap();
    dev.write_at(&vec![0x11; 4 * CS as usize], 0).unwrap();
    dev.flush().unwrap();
    (held, dev)
}

/// Two writes of marker bytes at `offs` (in two clusters) must meet inside the storage.
fn writes_meet(options: &str, offs: [u64; 2]) {
    let (held, dev) = image(true, options);
    held.armed.store(true, Ordering::SeqCst);
    thread::scope(|s| {
        for (k, off) in offs.into_iter().enumerate() {
            let dev = dev.clone();
            s.spawn(move || {
                dev.write_at(&[OVERWRITE; 4096], off)
                    .unwrap_or_else(|e| panic!("writer {k}: {e}"))
            });
        }
    });
    held.armed.store(false, Ordering::SeqCst);
    assert_eq!(
        held.gate.lock().unwrap().arrived,
        2,
        "{options}: held writes"
    );
    assert!(
        !held.lonely.load(Ordering::SeqCst),
        "{options}: the two writes did not run at once (writes serialised)"
    );
    let got = read_all(dev.as_ref());
    let mut want = vec![0x11u8; 4 * CS as usize];
    want.resize(1 << 20, 0);
    for o in offs {
        want[o as usize..o as usize + 4096].fill(OVERWRITE);
    }
    assert!(got == want, "{options}: contents after the overwrites");
    dev.close().unwrap();
}

/// Overwrites inside clusters 0 and 1 (allocated by [`image`]).
const OVERWRITES: [u64; 2] = [4096, CS + 8192];

#[test]
fn overwrites_of_two_allocated_clusters_run_at_once() {
    writes_meet("", OVERWRITES);
}

#[test]
fn overwrites_of_allocated_subclusters_run_at_once() {
    writes_meet("extended_l2=on", OVERWRITES);
}

#[test]
fn overwrites_on_a_version_2_image_run_at_once() {
    writes_meet("compat=0.10", OVERWRITES);
}

/// While an overwrite of cluster 0 is held inside the storage, `op` (started once it is
/// inside) must not finish: it changes mappings and needs the exclusive lock.
fn excluded_while_overwriting(what: &str, op: impl FnOnce(&dyn BlockDevice) + Send) {
    excluded_while_writing(what, 4096, op);
}

/// While a write of marker bytes at `at` is held inside the storage, `op` (started once
/// it is inside) must not finish.
fn excluded_while_writing(what: &str, at: u64, op: impl FnOnce(&dyn BlockDevice) + Send) {
    let (held, dev) = image(false, "");
    held.armed.store(true, Ordering::SeqCst);
    let op_done_early = AtomicBool::new(false);
    thread::scope(|s| {
        let d = dev.clone();
        s.spawn(move || d.write_at(&[OVERWRITE; 4096], at).unwrap());
        held.wait_inside();
        let d = dev.clone();
        let (held, early) = (&held, &op_done_early);
        s.spawn(move || {
            op(d.as_ref());
            // The hold ends before the overwrite lets go of the lock.
            early.store(!held.released(), Ordering::SeqCst);
        });
    });
    held.armed.store(false, Ordering::SeqCst);
    assert!(
        !op_done_early.load(Ordering::SeqCst),
        "{what} finished while an in-place overwrite was in flight"
    );
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, at).unwrap();
    assert!(
        b.iter().all(|&x| x == OVERWRITE || x == 0),
        "{what}: overwritten range"
    );
    dev.close().unwrap();
}

#[test]
fn discard_waits_for_overwrites_in_flight() {
    excluded_while_overwriting("discard", |d| d.discard(0, CS).unwrap());
}

#[test]
fn zeroing_waits_for_overwrites_in_flight() {
    excluded_while_overwriting("write_zeroes", |d| {
        d.write_zeroes(0, CS, ZeroFlags { may_unmap: true })
            .unwrap()
    });
}

#[test]
fn allocating_write_waits_for_overwrites_in_flight() {
    excluded_while_overwriting("allocating write", |d| {
        d.write_at(&[0x22; 4096], 8 * CS).unwrap()
    });
}

#[test]
fn close_waits_for_overwrites_in_flight() {
    excluded_while_overwriting("close", |d| d.close().unwrap());
}

/// An allocation of cluster 8 (`at`) is in flight, its data write held (under the
/// exclusive lock today; these guard any change that drops it, see docs/benchmarks.md).
const ALLOCATION: u64 = 8 * CS + 4096;

#[test]
fn a_write_to_a_cluster_being_allocated_waits() {
    // qemu's cluster allocation dependencies: the second write must see the cluster
    // allocated (else it would allocate it a second time).
    excluded_while_writing("a write to the same cluster", ALLOCATION, |d| {
        d.write_at(&[0x33; 512], 8 * CS).unwrap()
    });
}

#[test]
fn discard_waits_for_allocations_in_flight() {
    excluded_while_writing("discard", ALLOCATION, |d| d.discard(8 * CS, CS).unwrap());
}

#[test]
fn close_waits_for_allocations_in_flight() {
    excluded_while_writing("close", ALLOCATION, |d| d.close().unwrap());
}
