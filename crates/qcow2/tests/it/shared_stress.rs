//! Multi-writer stress of in-place overwrites under the shared lock (issues 17/21/20):
//! four threads overwrite interleaved 512-byte sectors of the same allocated clusters
//! (sector `s` belongs to thread `s % 4`) while a fifth discards and zeroes whole
//! clusters under them (which the owners' next writes allocate again), and allocates,
//! overwrites, zeroes and discards in a range of its own, with flushes from everyone.
//!
//! The model: a sector written while a discard of its cluster ran may hold either the
//! written bytes or zeroes (both orders are legal); any other sector is exact. Each
//! cluster's discards bump a sequence number (odd while one runs), which the owners read
//! around their writes to know. Reads check only when no discard of the cluster ran
//! around them. At the end the image is closed and read back, `qemu-img compare`
//! compares it with what we read, and `qemu-img check` must find it clean.
//!
//! `DISKIMG_STRESS_SECS=<n>` runs each variant `n` seconds (default 1.5).

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diskimg_blockio::{BlockDevice, ZeroFlags};
use diskimg_testutil::{Rng, pattern, qemu_check_json, qemu_compare, read_all, tempdir};

const SIZE: u64 = 4 << 20;
const CS: u64 = 65536;
const SECTOR: u64 = 512;
const OWNERS: u64 = 4;
/// The clusters the owners overwrite (and the churn thread discards under them).
const SHARED: u64 = SIZE / 2;

/// What an owner's sector holds: every byte `fill`, or zeroes when `maybe_zero`.
#[derive(Debug, Default, Clone, Copy)]
struct Sect {
    fill: u8,
    maybe_zero: bool,
    writing: bool,
    /// A discard of the cluster reached this sector while `writing` (its owner
    /// may have read the sequence before that discard began).
    dropped: bool,
    /// The cluster's discard sequence read after the last write.
    s2: u64,
}

struct Shared<'a> {
    dev: &'a dyn BlockDevice,
    sects: Vec<Mutex<Sect>>,
    /// Per cluster of the shared half: discards so far, twice (odd while one runs).
    dseq: Vec<AtomicU64>,
}

fn fill_of(s: u64) -> u8 {
    (s % 251) as u8 + 1
}

impl Shared<'_> {
    fn seq(&self, s: u64) -> u64 {
        self.dseq[(s * SECTOR / CS) as usize].load(Ordering::SeqCst)
    }

    /// Owner `id`: writes (or zeroes) sector `s` with `fill`.
    fn write(&self, s: u64, fill: u8, unmap: Option<bool>) {
        {
            let mut st = self.sects[s as usize].lock().unwrap();
            st.writing = true;
            st.dropped = false;
        }
        let s1 = self.seq(s);
        match unmap {
            None => self
                .dev
                .write_at(&[fill; SECTOR as usize], s * SECTOR)
                .unwrap(),
            Some(u) => {
                let flags = ZeroFlags { may_unmap: u };
                self.dev.write_zeroes(s * SECTOR, SECTOR, flags).unwrap()
            }
        }
        let s2 = self.seq(s);
        let mut st = self.sects[s as usize].lock().unwrap();
        *st = Sect {
            fill,
            maybe_zero: s1 != s2 || s1 % 2 == 1 || st.dropped,
            writing: false,
            dropped: false,
            s2,
        };
    }

    fn check(&self, s: u64, got: &[u8], when: &str) {
        let st = *self.sects[s as usize].lock().unwrap();
        let ok =
            got.iter().all(|&b| b == st.fill) || (st.maybe_zero && got.iter().all(|&b| b == 0));
        assert!(ok, "{when}: sector {s} reads {:?}, model {st:?}", &got[..8]);
    }

    fn verify(&self, s: u64) {
        let mut got = [0u8; SECTOR as usize];
        let s1 = self.seq(s);
        self.dev.read_at(&mut got, s * SECTOR).unwrap();
        if s1.is_multiple_of(2) && self.seq(s) == s1 {
            self.check(s, &got, "during the run");
        }
    }

    /// Discards or zeroes cluster `c` of the shared half under its owners.
    fn drop_cluster(&self, c: u64, how: u64) {
        let d_start = self.dseq[c as usize].fetch_add(1, Ordering::SeqCst) + 1;
        match how {
            0 => self.dev.discard(c * CS, CS).unwrap(),
            k => {
                let flags = ZeroFlags { may_unmap: k == 1 };
                self.dev.write_zeroes(c * CS, CS, flags).unwrap()
            }
        }
        // The sequence stays odd until the model is updated too: a reader that saw
        // it even again would otherwise compare zeroes with a not yet dropped sector.
        for s in c * CS / SECTOR..(c + 1) * CS / SECTOR {
            let mut st = self.sects[s as usize].lock().unwrap();
            // A write that returned before the discard began is gone; one overlapping
            // it is marked by its owner (or here, when the owner has not recorded it
            // yet: its sequence may predate this discard); a later one stands.
            if st.writing {
                st.dropped = true;
            } else if st.s2 < d_start {
                st.fill = 0;
                st.maybe_zero = false;
            }
        }
        self.dseq[c as usize].fetch_add(1, Ordering::SeqCst);
    }
}

/// The fifth thread: drops shared clusters, and works its own half exactly.
struct Churn {
    model: Vec<u8>,
    rng: Rng,
}

impl Churn {
    fn step(&mut self, sh: &Shared<'_>, tick: u64) {
        let dev = sh.dev;
        let own = |r: &mut Rng, max: u64| {
            let off = SHARED + r.below((SIZE - SHARED) / SECTOR) * SECTOR;
            (
                off,
                (1 + r.below(max / SECTOR)).min((SIZE - off) / SECTOR) * SECTOR,
            )
        };
        match self.rng.below(12) {
            0..=2 => {
                let c = self.rng.below(SHARED / CS);
                let how = self.rng.below(3);
                sh.drop_cluster(c, how);
            }
            3..=6 => {
                // Any byte offset and length (encrypted images: partial sectors too).
                let off = SHARED + self.rng.below(SIZE - SHARED - 1);
                let len = (1 + self.rng.below(3 * CS)).min(SIZE - off);
                let data = pattern(tick | 1 << 40, len as usize);
                dev.write_at(&data, off).unwrap();
                self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            7 => {
                let c = (SHARED + self.rng.below((SIZE - SHARED) / CS) * CS) / CS;
                dev.discard(c * CS, CS).unwrap();
                let mut got = vec![0u8; CS as usize];
                dev.read_at(&mut got, c * CS).unwrap();
                let r = (c * CS) as usize..((c + 1) * CS) as usize;
                let old = &self.model[r.clone()];
                assert!(got == old || got.iter().all(|&b| b == 0), "discarded {c}");
                self.model[r].copy_from_slice(&got);
            }
            8 => {
                let (off, len) = own(&mut self.rng, CS);
                let flags = ZeroFlags {
                    may_unmap: tick.is_multiple_of(2),
                };
                dev.write_zeroes(off, len, flags).unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            9 => dev.flush().unwrap(),
            _ => {
                let (off, len) = own(&mut self.rng, 2 * CS);
                let mut got = vec![0u8; len as usize];
                dev.read_at(&mut got, off).unwrap();
                let want = &self.model[off as usize..(off + len) as usize];
                assert!(got == want, "churn range {off}+{len}");
            }
        }
    }
}

fn owner(sh: &Shared<'_>, id: u64, until: Instant) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id + 1) * 0x1234_5678_9abc));
    let mut tick = 0u64;
    while Instant::now() < until || tick < 300 {
        let s = rng.below(SHARED / SECTOR / OWNERS) * OWNERS + id;
        match rng.below(12) {
            0..=6 => sh.write(s, 1 + ((tick + id * 64) % 255) as u8, None),
            7 => sh.write(s, 0, Some(rng.below(2) == 0)),
            8..=10 => sh.verify(s),
            _ => sh.dev.flush().unwrap(),
        }
        tick += 1;
    }
}

/// The stress on a fresh image made with `options` in `dir`.
fn stress(options: &str) {
    let dir = tempdir();
    let img = dir.path().join("s.qcow2");
    // `DATA` names an external data file beside the image (qemu needs the whole path).
    let data = dir.path().join("s.data");
    let made = options.replace("DATA", data.to_str().unwrap());
    let enc = made.contains("encrypt.");
    if enc {
        crate::encrypt::our_create(&img, SIZE, &made).unwrap();
    } else {
        crate::create(&img, SIZE, &made).unwrap();
    }
    let open = |ro| match enc {
        true => crate::encrypt::open_enc(&img, ro),
        false => crate::open(&img, ro),
    };
    let dev = open(false);
    // Everything allocated: the shared half as each sector's fill byte.
    let mut init = pattern(5, SIZE as usize);
    for s in 0..SHARED / SECTOR {
        init[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize].fill(fill_of(s));
    }
    dev.write_at(&init, 0).unwrap();
    dev.flush().unwrap();
    let sh = Shared {
        dev: dev.as_ref(),
        sects: (0..SHARED / SECTOR)
            .map(|s| {
                Mutex::new(Sect {
                    fill: fill_of(s),
                    ..Sect::default()
                })
            })
            .collect(),
        dseq: (0..SHARED / CS).map(|_| AtomicU64::new(0)).collect(),
    };
    let until = Instant::now() + duration();
    let churn = std::thread::scope(|s| {
        for id in 0..OWNERS {
            let sh = &sh;
            s.spawn(move || owner(sh, id, until));
        }
        let sh = &sh;
        let model = init.clone();
        s.spawn(move || {
            let mut c = Churn {
                model,
                rng: Rng(77),
            };
            let mut tick = 0u64;
            while Instant::now() < until || tick < 200 {
                c.step(sh, tick);
                tick += 1;
            }
            c.model
        })
        .join()
        .unwrap()
    });
    dev.close().unwrap();
    let got = read_all(open(true).as_ref());
    finish(dir.path(), &img, &sh, (&got, &churn), options);
}

/// Reads the closed image back, checks it against the model and has qemu judge it.
fn finish(dir: &Path, img: &Path, sh: &Shared<'_>, (got, churn): (&[u8], &[u8]), options: &str) {
    for s in 0..SHARED / SECTOR {
        let r = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
        sh.check(s, &got[r], &format!("{options}: after close"));
    }
    assert!(
        got[SHARED as usize..] == churn[SHARED as usize..],
        "{options}: the churn half differs from its model"
    );
    if options.contains("encrypt.") {
        // qemu decrypts the same bytes, and checks the image clean.
        assert!(
            crate::encrypt::qemu_raw(img) == got,
            "{options}: qemu reads otherwise"
        );
        crate::encrypt::assert_check_clean(img);
        return;
    }
    let raw = dir.join("got.raw");
    std::fs::write(&raw, got).unwrap();
    assert!(
        qemu_compare(img, "qcow2", &raw, "raw"),
        "{options}: qemu-img compare"
    );
    let (v, _) = qemu_check_json(img, "qcow2");
    for k in ["corruptions", "check-errors", "leaks"] {
        assert_eq!(v[k].as_u64().unwrap_or(0), 0, "{options}: {k}: {v}");
    }
}

fn duration() -> Duration {
    let secs = std::env::var("DISKIMG_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.5);
    Duration::from_secs_f64(secs)
}

#[test]
fn overwriters_with_discards_and_allocations() {
    stress("");
}

#[test]
fn overwriters_of_subclusters_with_discards_and_allocations() {
    stress("extended_l2=on");
}

#[test]
fn overwriters_on_version_2_with_discards() {
    stress("compat=0.10");
}

#[test]
fn overwriters_with_an_external_data_file() {
    stress("data_file=DATA");
}

#[test]
fn overwriters_of_an_encrypted_image() {
    stress("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10");
}
