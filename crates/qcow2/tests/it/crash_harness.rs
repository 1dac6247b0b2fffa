//! The crash harness the crash tests share. A workload of writes runs on a
//! [`FaultStorage`] cut at one operation (every operation of a clean run in turn); every
//! image such a crash can leave ([`crash_images`]: each [`CrashMode`]) must pass
//! our check with no corruption, `qemu-img check` must agree on the cuts and modes a
//! [`Judge`] names, and each piece of the guest must read either what it held at the
//! last completed flush or what a write since put there ([`assert_old_or_new`]).

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CheckReport, CrashMode, CreateRequest, Driver, FaultStorage, MemStorage,
    OpenOptions, OptionList, Storage,
};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::read_all;

/// One write of a workload: `len` bytes of `byte` at guest offset `off`.
#[derive(Clone, Copy, Debug)]
pub struct Write {
    /// Guest offset.
    pub off: u64,
    /// Length in bytes.
    pub len: usize,
    /// The fill byte.
    pub byte: u8,
}

/// What a run of a [`Workload`] leaves.
pub struct Outcome {
    /// The storage (crashed when the run was cut).
    pub fs: Arc<FaultStorage>,
    /// The guest contents at the last completed flush.
    pub durable: Vec<u8>,
    /// The writes since (a failed one included: it may have reached the storage in part).
    pub since: Vec<Write>,
}

impl Outcome {
    /// The guest contents after every write: `durable` with the writes since applied.
    pub fn model(&self) -> Vec<u8> {
        let mut m = self.durable.clone();
        for w in &self.since {
            m[w.off as usize..w.off as usize + w.len].fill(w.byte);
        }
        m
    }
}

/// The bytes of a new qcow2 image of `size` bytes made with `options`.
pub fn image(size: u64, options: &str) -> Vec<u8> {
    let base: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(size, OptionList::parse(options).unwrap());
    DRIVER.create(base.clone(), &mut req).unwrap();
    let mut initial = vec![0u8; base.len().unwrap() as usize];
    base.read_exact_at(&mut initial, 0).unwrap();
    initial
}

/// Writes on one image with a guest flush after every `every` writes.
pub struct Workload {
    /// The image before the workload.
    pub initial: Vec<u8>,
    /// Its virtual size.
    pub size: u64,
    /// The writes, in order.
    pub ops: Vec<Write>,
    /// A guest flush follows every `every`-th write.
    pub every: usize,
    /// How the workload opens the image (read-write).
    pub open: OpenOptions,
}

impl Workload {
    /// Runs the workload on a storage cut at `cut` (or never: then the device is closed)
    /// until the first failing write or flush.
    pub fn run(&self, cut: Option<u64>) -> Outcome {
        let fs = Arc::new(FaultStorage::new(self.initial.clone(), cut));
        let dev = DRIVER.open(fs.clone(), &self.open).unwrap();
        let mut now = vec![0u8; self.size as usize];
        let mut durable = now.clone();
        let mut since = Vec::new();
        for (k, w) in self.ops.iter().copied().enumerate() {
            // Recorded first: a failed write may have reached the storage in part.
            since.push(w);
            if dev.write_at(&vec![w.byte; w.len], w.off).is_err() {
                break;
            }
            now[w.off as usize..w.off as usize + w.len].fill(w.byte);
            if (k + 1) % self.every == 0 {
                if dev.flush().is_err() {
                    break;
                }
                durable = now.clone();
                since.clear();
            }
        }
        if cut.is_none() {
            dev.close().unwrap();
        }
        Outcome { fs, durable, since }
    }

    /// A clean run, then the workload cut at each of its operations. The clean image
    /// (every write flushed out, written to `path`) passes `qemu_clean` and reads back
    /// every write; the clean run has more than `min_ops` operations; each cut passes
    /// [`Workload::check_cut`] with `judge` and `piece`.
    pub fn crash_every_cut(
        &self,
        path: &Path,
        min_ops: u64,
        piece: usize,
        judge: &Judge<'_>,
        qemu_clean: impl FnOnce(&Path),
    ) {
        let clean = self.run(None);
        assert!(clean.since.is_empty() || !self.ops.len().is_multiple_of(self.every));
        let count = clean.fs.ops();
        std::fs::write(path, clean.fs.crash_image(CrashMode::DropUnflushed)).unwrap();
        qemu_clean(path);
        let dev = crate::open(path, true);
        assert!(read_all(dev.as_ref()) == clean.model());
        drop(dev);
        assert!(count > min_ops, "{count}");
        for cut in 0..count {
            self.check_cut(cut, piece, judge);
        }
    }

    /// The workload cut at `cut`: every crash image passes `judge`'s checks and reads,
    /// in `piece`-byte pieces, old or new data ([`assert_old_or_new`]).
    pub fn check_cut(&self, cut: u64, piece: usize, judge: &Judge<'_>) {
        let o = self.run(Some(cut));
        assert!(o.fs.crashed());
        judge.images(&o.fs, cut, |c| {
            assert_old_or_new(&read_all(c.dev), &o, piece, c.what);
        });
    }
}

/// Asserts that each `piece`-byte piece of `got` (a crash image's guest contents) is
/// what the last flush of `o` left or lies inside one write since and holds its byte.
pub fn assert_old_or_new(got: &[u8], o: &Outcome, piece: usize, what: &str) {
    for (b, (g, d)) in got.chunks(piece).zip(o.durable.chunks(piece)).enumerate() {
        let off = (b * piece) as u64;
        let new = o.since.iter().any(|w| {
            w.off <= off
                && off + g.len() as u64 <= w.off + w.len as u64
                && g.iter().all(|&x| x == w.byte)
        });
        assert!(
            g == d || new,
            "{what}: the {piece} bytes at {off} hold neither old nor new data"
        );
    }
}

/// The three images a crash at `cut` can leave on `fs` (every write kept, the unflushed
/// ones dropped, a random subset: `diskimg_testutil::crash::images`), each with its mode
/// and opened with `opts`.
pub fn crash_images(
    fs: &FaultStorage,
    cut: u64,
    opts: &OpenOptions,
) -> Vec<(CrashMode, Vec<u8>, Arc<dyn BlockDevice>)> {
    diskimg_testutil::crash::images(&DRIVER, fs, cut, opts)
}

/// Our check of a crash image `dev`: no corruption and no check error (`what` names the
/// cut). Returns the report.
pub fn assert_cut_checks_clean(dev: &dyn BlockDevice, what: &str) -> CheckReport {
    let r = dev.check(Default::default()).unwrap();
    assert_eq!((r.corruptions, r.check_errors), (0, 0), "{what}: {r:?}");
    r
}

/// qemu-img check of `img` (written to `path`): no corruption, no check error, and as
/// many leaks as our check found (`ours`).
pub fn assert_qemu_check_agrees(path: &Path, img: &[u8], ours: &CheckReport, what: &str) {
    std::fs::write(path, img).unwrap();
    let (v, _) = diskimg_testutil::qemu_check_json(path, "qcow2");
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    assert_eq!(n("corruptions"), 0, "{what}: {v}");
    assert_eq!(n("check-errors"), 0, "{what}: {v}");
    assert_eq!(n("leaks"), ours.leaks, "{what}: {v}");
}

/// One image a crash left, opened read-only and passed by our check.
pub struct Crashed<'a> {
    /// Its name in messages: `cut N Mode`.
    pub what: &'a str,
    /// The crash mode that made it.
    pub mode: CrashMode,
    /// The image's bytes.
    pub img: &'a [u8],
    /// Our check's report.
    pub report: &'a CheckReport,
    /// The image opened read-only.
    pub dev: &'a dyn BlockDevice,
}

/// What [`Judge::prepare`] runs on each crash image's device.
pub type Prepare<'a> = dyn Fn(&dyn BlockDevice) + 'a;

/// How the images a crash leaves are judged: our check on every one (no corruption, no
/// check error); `qemu-img check` (a process each), where [`Judge::qemu`] says, must find
/// no corruption, no check error and the same leaks.
pub struct Judge<'a> {
    /// `qemu-img check` judges the image (written to `.0`) on the cuts that are
    /// multiples of `.1`, for every mode but `.2`; `None`: never.
    pub qemu: Option<(&'a Path, u64, CrashMode)>,
    /// Applied to each crash image's device before any check (a backing file, say).
    pub prepare: Option<&'a Prepare<'a>>,
}

impl<'a> Judge<'a> {
    /// `qemu-img check` on every `every`-th cut, for the modes other than `skips`.
    pub fn new(path: &'a Path, every: u64, skips: CrashMode) -> Self {
        Self {
            qemu: Some((path, every, skips)),
            prepare: None,
        }
    }

    /// Our check only.
    pub fn ours_only() -> Self {
        Self {
            qemu: None,
            prepare: None,
        }
    }

    /// Whether `qemu-img check` judges the image of `mode` at `cut`.
    pub fn qemu_judges(&self, cut: u64, mode: CrashMode) -> bool {
        self.qemu
            .is_some_and(|(_, every, skips)| cut.is_multiple_of(every) && mode != skips)
    }

    /// Judges every image a crash at `cut` left on `fs` (opened read-only, after
    /// `prepare`), then hands each to `more`.
    pub fn images(&self, fs: &FaultStorage, cut: u64, mut more: impl FnMut(Crashed<'_>)) {
        let ro = OpenOptions::new().read_only(true);
        for (mode, img, dev) in crash_images(fs, cut, &ro) {
            if let Some(p) = self.prepare {
                p(dev.as_ref());
            }
            let what = format!("cut {cut} {mode:?}");
            let report = assert_cut_checks_clean(dev.as_ref(), &what);
            if let Some((path, ..)) = self.qemu
                && self.qemu_judges(cut, mode)
            {
                assert_qemu_check_agrees(path, &img, &report, &what);
            }
            more(Crashed {
                what: &what,
                mode,
                img: &img,
                report: &report,
                dev: dev.as_ref(),
            });
        }
    }
}

/// Asserts `qemu-img check` of `path` finds no leak and no corruption (its exit code
/// and check errors aside).
pub fn assert_qemu_no_leaks_or_corruptions(path: &Path) {
    let (v, _) = diskimg_testutil::qemu_check_json(path, "qcow2");
    assert_eq!(v["leaks"].as_u64().unwrap_or(0), 0, "{v}");
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{v}");
}
