//! The crash sweep the formats' crash tests share (`tests/it/crash*.rs` of qcow2, vdi,
//! vhd, vmdk and vhdx): a workload runs on a [`FaultStorage`] that stops persisting at
//! one operation — each operation of a clean run in turn ([`count_ops`], [`sweep`]) —
//! and every image such a crash can leave ([`modes`], [`images`]) is judged by the
//! test: it opens, its check finds no corruption, and what was flushed before the cut
//! reads back ([`Durable`]).

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, Driver, FaultStorage, MemStorage, OpenOptions, Storage,
};

/// The images a crash can leave, in the order the sweeps judge them: every write kept,
/// the unflushed writes dropped, a random subset of them (drawn from `seed`).
pub fn modes(seed: u64) -> [CrashMode; 3] {
    [
        CrashMode::KeepAll,
        CrashMode::DropUnflushed,
        CrashMode::Random(seed),
    ]
}

/// How many storage operations (writes and flushes) `run` makes on a storage holding
/// `initial` that never fails: the cuts a sweep must try.
pub fn count_ops(initial: &[u8], run: impl FnOnce(Arc<FaultStorage>)) -> u64 {
    let fs = Arc::new(FaultStorage::new(initial.to_vec(), None));
    run(fs.clone());
    fs.ops()
}

/// One image a crash left, handed to a [`sweep`]'s judge.
pub struct Crash<'a, T> {
    /// The operation the storage stopped at.
    pub cut: u64,
    /// The crash mode that made the image.
    pub mode: CrashMode,
    /// The image's bytes.
    pub img: Vec<u8>,
    /// What the workload returned on the cut storage (how far it got, say).
    pub ran: &'a T,
}

impl<T> Crash<'_, T> {
    /// The image's name in assertion messages: `cut N Mode`.
    pub fn what(&self) -> String {
        format!("cut {} {:?}", self.cut, self.mode)
    }
}

/// Runs `run` on a storage holding `initial` cut at each of `cuts`, and hands every
/// image the crash can leave (the [`modes`] of `seed(cut)`) to `judge`. The workload
/// runs once per cut: [`FaultStorage::crash_image`] makes each mode's image from the
/// same run.
pub fn sweep<T>(
    initial: &[u8],
    cuts: impl IntoIterator<Item = u64>,
    seed: impl Fn(u64) -> u64,
    run: impl Fn(Arc<FaultStorage>) -> T,
    mut judge: impl FnMut(Crash<'_, T>),
) {
    for cut in cuts {
        let fs = Arc::new(FaultStorage::new(initial.to_vec(), Some(cut)));
        let ran = run(fs.clone());
        for mode in modes(seed(cut)) {
            let img = fs.crash_image(mode);
            judge(Crash {
                cut,
                mode,
                img,
                ran: &ran,
            });
        }
    }
}

/// Opens image bytes `img` (copied into a [`MemStorage`]) with `driver`, panicking with
/// `what` when it does not open.
pub fn open_image(
    driver: &dyn Driver,
    img: &[u8],
    opts: &OpenOptions,
    what: &str,
) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.to_vec()));
    driver
        .open(s, opts)
        .unwrap_or_else(|e| panic!("{what}: the crash image does not open: {e}"))
}

/// The images a crash at `cut` left on `fs` (the [`modes`] of `seed`), each with its mode
/// and opened by `driver` with `opts`.
pub fn images(
    driver: &dyn Driver,
    fs: &FaultStorage,
    seed: u64,
    opts: &OpenOptions,
) -> Vec<(CrashMode, Vec<u8>, Arc<dyn BlockDevice>)> {
    modes(seed)
        .into_iter()
        .map(|mode| {
            let img = fs.crash_image(mode);
            let dev = open_image(driver, &img, opts, &format!("{mode:?}"));
            (mode, img, dev)
        })
        .collect()
}

/// The guest as a crash test knows it: its contents now, at the last completed flush,
/// and which bytes were written (or attempted) since — those may read either way after
/// a crash; every other byte must read as flushed.
#[derive(Clone, Debug)]
pub struct Durable {
    now: Vec<u8>,
    flushed: Vec<u8>,
    touched: Vec<bool>,
}

impl Durable {
    /// A guest holding `initial`, all of it flushed.
    pub fn new(initial: Vec<u8>) -> Self {
        let touched = vec![false; initial.len()];
        Self {
            flushed: initial.clone(),
            now: initial,
            touched,
        }
    }

    /// A write of `data` at `off` (record it before the device write: a failed write may
    /// have reached the storage in part).
    pub fn write(&mut self, off: u64, data: &[u8]) {
        let r = off as usize..off as usize + data.len();
        self.touched[r.clone()].fill(true);
        self.now[r].copy_from_slice(data);
    }

    /// A zero write of `len` bytes at `off` (recorded as [`Durable::write`]).
    pub fn zero(&mut self, off: u64, len: u64) {
        let r = off as usize..(off + len) as usize;
        self.touched[r.clone()].fill(true);
        self.now[r].fill(0);
    }

    /// A completed flush: everything written so far is durable.
    pub fn flushed(&mut self) {
        self.flushed.clone_from(&self.now);
        self.touched.fill(false);
    }

    /// The contents at the last completed flush.
    pub fn at_flush(&self) -> &[u8] {
        &self.flushed
    }

    /// The contents after every write.
    pub fn now(&self) -> &[u8] {
        &self.now
    }

    /// Asserts that every byte of `got` (a crash image's guest contents, at least as
    /// long as the guest) reads as flushed unless a write since touched it.
    pub fn assert_holds(&self, got: &[u8], what: &str) {
        let bad = self
            .flushed
            .iter()
            .zip(got)
            .zip(&self.touched)
            .position(|((f, g), &t)| f != g && !t);
        if let Some(i) = bad {
            panic!(
                "{what}: byte {i} is {}, flushed {} (no write since)",
                got[i], self.flushed[i]
            );
        }
        assert!(got.len() >= self.flushed.len(), "{what}: guest too short");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_tracks_the_last_flush() {
        let mut d = Durable::new(vec![0; 8]);
        d.write(0, &[1, 1]);
        d.flushed();
        d.write(4, &[2, 2]);
        d.zero(0, 1);
        assert_eq!(d.now(), &[0, 1, 0, 0, 2, 2, 0, 0]);
        assert_eq!(d.at_flush(), &[1, 1, 0, 0, 0, 0, 0, 0]);
        d.assert_holds(&[0, 1, 0, 0, 2, 0, 0, 0], "old or new");
        let r = std::panic::catch_unwind(|| d.assert_holds(&[1, 0, 0, 0, 0, 0, 0, 0], "x"));
        assert!(r.is_err(), "byte 1 was flushed as 1 and not written since");
    }

    #[test]
    fn sweep_judges_every_mode_of_every_cut() {
        let initial = vec![0u8; 16];
        let run = |fs: Arc<FaultStorage>| {
            let ok = fs.write_all_at(&[7; 4], 0).is_ok() && fs.flush().is_ok();
            ok && fs.write_all_at(&[9; 4], 8).is_ok()
        };
        let total = count_ops(&initial, |fs| assert!(run(fs)));
        assert_eq!(total, 3);
        let mut seen = Vec::new();
        sweep(
            &initial,
            0..=total,
            |c| c + 1,
            run,
            |c| {
                seen.push((c.cut, c.mode, *c.ran, c.img[0], c.img[8]));
            },
        );
        assert_eq!(seen.len(), 12);
        // Cut before the flush: the first write is not durable, KeepAll keeps it anyway.
        assert_eq!(seen[0], (0, CrashMode::KeepAll, false, 0, 0));
        assert_eq!(seen[3].1, CrashMode::KeepAll);
        // Past the flush, the first write survives every mode.
        assert!(seen[6..].iter().all(|s| s.3 == 7));
        // Nothing was cut at 3: the last write is kept, but only KeepAll is sure to.
        assert_eq!(seen[9], (3, CrashMode::KeepAll, true, 7, 9));
        assert_eq!(seen[10], (3, CrashMode::DropUnflushed, true, 7, 0));
    }
}
