//! Multi-writer stress test (issue 17): four threads share one open device of every
//! writable format, over a backing file where the format has one (copy-on-write).
//!
//! In the shared half of the disk every 512-byte sector belongs to one thread
//! (`sector % THREADS`), so the threads write, zero and read interleaved sectors of the
//! same clusters at once; each thread checks its own sectors against its model while the
//! others write around them. In its private quarter-of-the-rest each thread also writes
//! runs, zeroes them and discards whole clusters (a discarded sector must read as before,
//! zeroes or the backing file's data). Flushes come from every thread. At the end the
//! image is closed, read back, compared with the model by `qemu-img compare` and checked
//! by `qemu-img check` where qemu can check the format.
//!
//! Some writes and reads go through the vectored calls (`write_vectored_at`,
//! `read_vectored_at`) with uneven pieces.
//!
//! A few seconds per format by default; `DISKIMG_STRESS_SECS=<n>` runs each format for
//! `n` seconds (a soak).

use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::time::{Duration, Instant};

use diskimg::blockio::ZeroFlags;
use diskimg::{BlockDevice, Format, ImageOptions, OpenPolicy, OptionList, create, open};
use diskimg_testutil::{
    Rng, pattern, qemu_check_json, qemu_compare, qemu_img_ok, read_all, tempdir,
};

const SIZE: u64 = 8 << 20;
const THREADS: u64 = 4;
const SECTOR: u64 = 512;
/// The shared half: interleaved sectors.
const SHARED: u64 = SIZE / 2;
/// Each thread's private range (whole clusters for every format's discard).
const PRIVATE: u64 = (SIZE - SHARED) / THREADS;

fn opts(ro: bool) -> ImageOptions {
    ImageOptions::read_only(ro).with_policy(OpenPolicy::qemu_compatible())
}

fn duration() -> Duration {
    let secs = std::env::var("DISKIMG_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.5);
    Duration::from_secs_f64(secs)
}

/// One thread's view: the bytes of the disk it owns (others' bytes are not looked at).
struct Worker<'a> {
    id: u64,
    dev: &'a dyn BlockDevice,
    model: Vec<u8>,
    base: &'a [u8],
    rng: Rng,
}

impl Worker<'_> {
    fn own_sector(&mut self) -> u64 {
        let k = self.rng.below(SHARED / SECTOR / THREADS);
        (k * THREADS + self.id) * SECTOR
    }

    fn private(&mut self, align: u64) -> (u64, u64) {
        let start = SHARED + self.id * PRIVATE;
        let off = self.rng.below(PRIVATE / align) * align;
        let max = (PRIVATE - off) / align;
        let len = (1 + self.rng.below(max.min(4))) * align;
        (start + off, len)
    }

    fn verify(&self, off: u64, len: u64, what: &str) {
        let mut got = vec![0u8; len as usize];
        if off.is_multiple_of(1024) {
            self.dev.read_at(&mut got, off).unwrap();
        } else {
            let (a, b) = got.split_at_mut(len as usize / 2 + 1);
            let mut list = [IoSliceMut::new(a), IoSliceMut::new(b)];
            self.dev.read_vectored_at(&mut list, off).unwrap();
        }
        let want = &self.model[off as usize..(off + len) as usize];
        assert!(
            got == want,
            "thread {}: {what} at {off}+{len} reads wrong",
            self.id
        );
    }

    fn step(&mut self, tick: u64) {
        let zero = ZeroFlags {
            may_unmap: self.rng.next_u64() & 1 == 0,
        };
        match self.rng.below(20) {
            0..=8 => {
                let off = self.own_sector();
                let b = (tick as u8) | 1;
                self.dev.write_at(&[b; SECTOR as usize], off).unwrap();
                self.model[off as usize..(off + SECTOR) as usize].fill(b);
            }
            9..=10 => {
                let off = self.own_sector();
                self.dev.write_zeroes(off, SECTOR, zero).unwrap();
                self.model[off as usize..(off + SECTOR) as usize].fill(0);
            }
            11..=12 => {
                let off = self.own_sector();
                self.verify(off, SECTOR, "own sector");
            }
            13 => self.dev.flush().unwrap(),
            14..=15 => {
                let (off, len) = self.private(4096);
                let data = pattern(tick ^ (self.id << 32), len as usize);
                if tick.is_multiple_of(2) {
                    self.dev.write_at(&data, off).unwrap();
                } else {
                    // A guest scatter-gather list: three pieces of uneven length.
                    let (a, rest) = data.split_at(data.len() / 3 + 1);
                    let (b, c) = rest.split_at(rest.len() / 2);
                    let list = [IoSlice::new(a), IoSlice::new(b), IoSlice::new(c)];
                    self.dev.write_vectored_at(&list, off).unwrap();
                }
                self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            16 => {
                let (off, len) = self.private(SECTOR);
                self.dev.write_zeroes(off, len, zero).unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            17 => self.discard(),
            _ => {
                let (off, len) = self.private(SECTOR);
                self.verify(off, len, "private range");
            }
        }
    }

    /// Discards a 64 KiB-aligned range: each sector then reads as before, as zeroes or
    /// as the backing file; the model takes what it reads.
    fn discard(&mut self) {
        let (off, len) = self.private(65536);
        self.dev.discard(off, len).unwrap();
        let mut got = vec![0u8; len as usize];
        self.dev.read_at(&mut got, off).unwrap();
        for (k, g) in got.chunks(SECTOR as usize).enumerate() {
            let at = off as usize + k * SECTOR as usize;
            let old = &self.model[at..at + SECTOR as usize];
            let base = &self.base[at..at + SECTOR as usize];
            assert!(
                g == old || g.iter().all(|&x| x == 0) || g == base,
                "thread {}: discarded sector at {at} reads something else",
                self.id
            );
        }
        self.model[off as usize..(off + len) as usize].copy_from_slice(&got);
    }
}

/// Makes the base (a backing file in `fmt`, where the format takes one) and the image;
/// returns the image's path and the base's bytes (zeroes without one).
fn make(dir: &Path, fmt: Format, backed: bool) -> (std::path::PathBuf, Vec<u8>) {
    let base_raw = dir.join("base.raw");
    let bytes = pattern(17, SIZE as usize);
    std::fs::write(&base_raw, &bytes).unwrap();
    let img = dir.join(format!("stress.{}", fmt.name()));
    let (base_name, base_fmt) = match fmt {
        _ if !backed => (None, ""),
        Format::Raw | Format::Vdi => (None, ""),
        Format::Qcow2 => (Some("base.raw".to_string()), "raw"),
        f => {
            let name = format!("base.{}", f.name());
            qemu_img_ok(&[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                f.name(),
                base_raw.to_str().unwrap(),
                dir.join(&name).to_str().unwrap(),
            ]);
            (Some(name), f.name())
        }
    };
    match base_name {
        Some(b) => {
            let o = OptionList::parse(&format!("backing_file={b},backing_fmt={base_fmt}"));
            create(&img, fmt, None, o.unwrap(), &opts(false)).unwrap();
            (img, bytes)
        }
        None => {
            create(&img, fmt, Some(SIZE), OptionList::default(), &opts(false)).unwrap();
            (img, vec![0u8; SIZE as usize])
        }
    }
}

/// Runs the stress on `fmt`, over a backing file in the same format (raw for qcow2) when
/// `backed` and the format takes one.
fn stress(fmt: Format, backed: bool) {
    let dir = tempdir();
    let (img, base) = make(dir.path(), fmt, backed);
    let image = open(&img, Some(fmt), &opts(false)).unwrap();
    let dev = image.device.clone();
    assert!(
        dev.virtual_size() >= SIZE,
        "{fmt:?}: {}",
        dev.virtual_size()
    );
    let until = Instant::now() + duration();
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|id| {
                let (dev, base) = (dev.as_ref(), base.as_slice());
                s.spawn(move || {
                    let mut w = Worker {
                        id,
                        dev,
                        model: base.to_vec(),
                        base,
                        rng: Rng(0x9e37_79b9_7f4a_7c15 ^ ((id + 1) * 0x1234_5678_9abc)),
                    };
                    let mut tick = 0u64;
                    while Instant::now() < until || tick < 200 {
                        w.step(tick);
                        tick += 1;
                    }
                    w.model
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each thread's sectors from its model, the rest of the disk is the base.
    let mut want = base[..SIZE as usize].to_vec();
    for (id, m) in models.iter().enumerate() {
        let id = id as u64;
        for s in (id..SHARED / SECTOR).step_by(THREADS as usize) {
            let r = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
            want[r.clone()].copy_from_slice(&m[r]);
        }
        let p = (SHARED + id * PRIVATE) as usize..(SHARED + (id + 1) * PRIVATE) as usize;
        want[p.clone()].copy_from_slice(&m[p]);
    }
    dev.flush().unwrap();
    drop(dev);
    image.close().unwrap();
    drop(image);
    let back = open(&img, Some(fmt), &opts(true)).unwrap();
    let got = read_all(back.device.as_ref());
    assert!(
        got[..SIZE as usize] == want[..],
        "{fmt:?}: read back differs from the model"
    );
    drop(back);
    // qemu reads differencing VHD as plain dynamic images and cannot open differencing
    // VHDX: only our read-back judges those.
    if backed && matches!(fmt, Format::Vpc | Format::Vhdx) {
        return;
    }
    let model = dir.path().join("model.raw");
    let mut full = want;
    full.resize(got.len(), 0);
    std::fs::write(&model, &full).unwrap();
    if !qemu_compare(&img, fmt.name(), &model, "raw") {
        let kept = dir.keep();
        panic!("{fmt:?}: qemu-img compare (files in {})", kept.display());
    }
    if !matches!(fmt, Format::Raw | Format::Vpc) {
        let (v, _) = qemu_check_json(&img, fmt.name());
        assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{fmt:?}: {v}");
        assert_eq!(v["check-errors"].as_u64().unwrap_or(0), 0, "{fmt:?}: {v}");
        assert_eq!(v["leaks"].as_u64().unwrap_or(0), 0, "{fmt:?}: {v}");
    }
}

#[test]
fn stress_raw() {
    stress(Format::Raw, false);
}

#[test]
fn stress_qcow2_over_a_backing_file() {
    stress(Format::Qcow2, true);
}

#[test]
fn stress_qcow2() {
    stress(Format::Qcow2, false);
}

#[test]
fn stress_vmdk_over_a_backing_file() {
    stress(Format::Vmdk, true);
}

#[test]
fn stress_vdi() {
    stress(Format::Vdi, false);
}

#[test]
fn stress_vhdx() {
    stress(Format::Vhdx, false);
}

#[test]
fn stress_vhdx_over_a_backing_file() {
    stress(Format::Vhdx, true);
}

#[test]
fn stress_vpc() {
    stress(Format::Vpc, false);
}

#[test]
fn stress_vpc_over_a_backing_file() {
    stress(Format::Vpc, true);
}
