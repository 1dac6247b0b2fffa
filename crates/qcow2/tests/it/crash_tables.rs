//! Crash consistency of deferred L2 tables (`x-deferred-tables=on`): new L2 tables wait in
//! the cache and go out, whole, with the other deferred metadata, one storage flush before
//! all their L1 entries. Small clusters (512 bytes: one L2 table per 32 KiB of guest, one
//! refcount block per 128 KiB of host) make every few writes need a new table. The storage
//! is cut at every operation; under every crash mode the image must have no corruption
//! (our check and `qemu-img check`, with the same leaks), and every block must read either
//! what it held at the last completed flush or what was written to it since.

use std::sync::Arc;

use diskimg_blockio::{
    CrashMode, CreateRequest, Driver, FaultStorage, MemStorage, OpenOptions, OptionList, Storage,
};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{assert_qemu_check_clean, read_all, tempdir};

const SIZE: u64 = 1 << 20;
const CLUSTER: usize = 512;
/// Guest bytes one L2 table maps (64 entries of 512-byte clusters).
const L2_SPAN: u64 = 32 << 10;

/// One write: (offset, length, fill byte).
type Op = (u64, usize, u8);

/// What a run leaves: the storage, the contents at the last completed flush, the writes
/// since.
type Outcome = (Arc<FaultStorage>, Vec<u8>, Vec<Op>);

/// (offset, length, fill byte): whole-cluster runs and partial clusters spread over many
/// L2 ranges, some ranges written again.
fn ops() -> Vec<Op> {
    let mut v = Vec::new();
    for k in 0..36u64 {
        let table = (k * 7) % (SIZE / L2_SPAN);
        let inside = (k * 3 % 60) * CLUSTER as u64;
        let len = if k % 3 == 0 { 3 * CLUSTER } else { CLUSTER };
        v.push((table * L2_SPAN + inside, len, 1 + k as u8));
    }
    v.push((5 * L2_SPAN - 256, 1024, 0xee));
    v
}

fn image() -> Vec<u8> {
    let base: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::parse("cluster_size=512").unwrap());
    DRIVER.create(base.clone(), &mut req).unwrap();
    let mut initial = vec![0u8; base.len().unwrap() as usize];
    base.read_exact_at(&mut initial, 0).unwrap();
    initial
}

fn deferred(on: bool) -> OpenOptions {
    let mut o = OpenOptions::new();
    if on {
        o.driver_options.set("x-deferred-tables", "on");
    }
    o
}

/// Runs the workload with a flush every `every` writes; the cut is `cut`, or none.
/// Returns the storage, the contents at the last completed flush and the writes since.
fn run(initial: &[u8], cut: Option<u64>, every: usize) -> Outcome {
    let fs = Arc::new(FaultStorage::new(initial.to_vec(), cut));
    let dev = DRIVER.open(fs.clone(), &deferred(true)).unwrap();
    let mut now = vec![0u8; SIZE as usize];
    let mut durable = now.clone();
    let mut since = Vec::new();
    for (k, op @ (off, len, b)) in ops().into_iter().enumerate() {
        // Recorded first: a failed write may have reached the storage in part.
        since.push(op);
        if dev.write_at(&vec![b; len], off).is_err() {
            break;
        }
        now[off as usize..off as usize + len].fill(b);
        if (k + 1) % every == 0 {
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
    (fs, durable, since)
}

/// Whether 256-byte piece `g` at `off` is what the last flush left or one of the writes
/// since left there.
fn old_or_new(g: &[u8], d: &[u8], off: u64, since: &[Op]) -> bool {
    g == d
        || since.iter().any(|&(o, l, v)| {
            o <= off && off + g.len() as u64 <= o + l as u64 && g.iter().all(|&x| x == v)
        })
}

fn check_cut(initial: &[u8], cut: u64, every: usize, path: &std::path::Path) {
    let (fs, durable, since) = run(initial, Some(cut), every);
    assert!(fs.crashed());
    let ro = OpenOptions::new().read_only(true);
    for (mode, img, dev) in crate::crash_images(&fs, cut, &ro) {
        let what = format!("cut {cut} {mode:?}");
        let r = crate::assert_cut_checks_clean(dev.as_ref(), &what);
        if cut.is_multiple_of(4) && mode != CrashMode::KeepAll {
            crate::assert_qemu_check_agrees(path, &img, &r, &what);
        }
        let got = read_all(dev.as_ref());
        for (b, (g, d)) in got.chunks(256).zip(durable.chunks(256)).enumerate() {
            let off = (b * 256) as u64;
            assert!(
                old_or_new(g, d, off, &since),
                "{what}: bytes at {off} hold neither old nor new data"
            );
        }
    }
}

fn crash_every_cut(every: usize) {
    let initial = image();
    let (fs, want, since) = run(&initial, None, every);
    let count = fs.ops();
    let dir = tempdir();
    let path = dir.path().join("crash.qcow2");
    std::fs::write(&path, fs.crash_image(CrashMode::DropUnflushed)).unwrap();
    assert_qemu_check_clean(&path, "qcow2");
    let dev = crate::open(&path, true);
    let mut model = want;
    for (o, l, b) in since {
        model[o as usize..o as usize + l].fill(b);
    }
    assert!(read_all(dev.as_ref()) == model);
    drop(dev);
    assert!(count > 60, "{count}");
    for cut in 0..count {
        check_cut(&initial, cut, every, &path);
    }
}

#[test]
fn crash_with_deferred_tables_flush_every_5() {
    crash_every_cut(5);
}

#[test]
fn crash_with_deferred_tables_flush_only_at_close() {
    crash_every_cut(usize::MAX);
}

/// Storage flushes for allocating writes into 16 fresh L2 ranges and one guest flush:
/// one per new table in qemu's order, a few with deferred tables; same guest content.
#[test]
fn deferred_tables_save_flushes() {
    let initial = image();
    let mut images = Vec::new();
    let mut flushes = Vec::new();
    for on in [false, true] {
        let fs = Arc::new(FaultStorage::new(initial.clone(), None));
        let dev = DRIVER.open(fs.clone(), &deferred(on)).unwrap();
        for k in 0..16u64 {
            dev.write_at(&[k as u8 + 1; 2 * CLUSTER], k * 2 * L2_SPAN)
                .unwrap();
        }
        dev.flush().unwrap();
        flushes.push(fs.flushes());
        dev.close().unwrap();
        images.push(fs.crash_image(CrashMode::DropUnflushed));
    }
    assert!(flushes[0] >= 16, "{flushes:?}");
    assert!(flushes[1] <= 6, "{flushes:?}");
    let read = |img: &Vec<u8>| {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
        read_all(
            DRIVER
                .open(s, &OpenOptions::new().read_only(true))
                .unwrap()
                .as_ref(),
        )
    };
    assert!(read(&images[0]) == read(&images[1]));
    let dir = tempdir();
    let path = dir.path().join("t.qcow2");
    std::fs::write(&path, &images[1]).unwrap();
    assert_qemu_check_clean(&path, "qcow2");
}
