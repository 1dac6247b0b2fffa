//! Crash consistency of allocating writes through the cluster reserve (one storage
//! flush per guest flush): cut the storage at every operation of a workload of small
//! writes into fresh clusters; under every crash mode the image must have no
//! corruption (our check and `qemu-img check`), and every 4 KiB block must read either
//! what it held at the last completed flush or what was written to it since — never
//! anything else (no stale or lost data outside the writes).

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, CreateRequest, Driver, FaultStorage, MemStorage, OpenOptions,
    OptionList, Storage,
};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{qemu_check_json, read_all, tempdir};

const SIZE: u64 = 4 << 20;
const BLOCK: usize = 4096;
const CLUSTER: u64 = 65536;

/// (offset, fill byte): small writes into fresh clusters (some twice, some at the end
/// of a cluster, one spanning two clusters), then into clusters that already hold data.
fn ops() -> Vec<(u64, u8)> {
    let mut v = Vec::new();
    for k in 0..40u64 {
        let c = (k * 37) % (SIZE / CLUSTER);
        let inside = (k * 5 % 16) * BLOCK as u64;
        v.push((c * CLUSTER + inside, 1 + (k % 200) as u8));
    }
    v.push((3 * CLUSTER - BLOCK as u64, 0xee));
    v.push((5 * CLUSTER + 8192, 0xdd));
    v
}

fn write(dev: &dyn BlockDevice, (off, b): (u64, u8)) -> diskimg_blockio::Result<()> {
    dev.write_at(&[b; BLOCK], off)
}

pub(crate) fn image() -> Vec<u8> {
    let base: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::parse("").unwrap());
    DRIVER.create(base.clone(), &mut req).unwrap();
    let mut initial = vec![0u8; base.len().unwrap() as usize];
    base.read_exact_at(&mut initial, 0).unwrap();
    initial
}

/// Runs the workload with a flush every `every` writes; the cut is `cut`, or none.
/// Returns the storage, the contents at the last completed flush and the blocks written
/// since (with their new byte).
fn run(
    initial: &[u8],
    cut: Option<u64>,
    every: usize,
) -> (Arc<FaultStorage>, Vec<u8>, Vec<(u64, u8)>) {
    let fs = Arc::new(FaultStorage::new(initial.to_vec(), cut));
    let dev = DRIVER.open(fs.clone(), &OpenOptions::new()).unwrap();
    let mut now = vec![0u8; SIZE as usize];
    let mut durable = now.clone();
    let mut since = Vec::new();
    for (k, op) in ops().into_iter().enumerate() {
        // Recorded first: a failed write may have reached the storage in part.
        since.push(op);
        if write(dev.as_ref(), op).is_err() {
            break;
        }
        now[op.0 as usize..op.0 as usize + BLOCK].fill(op.1);
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

fn check_cut(initial: &[u8], cut: u64, every: usize, path: &std::path::Path) {
    let (fs, durable, since) = run(initial, Some(cut), every);
    assert!(fs.crashed());
    let ro = OpenOptions::new().read_only(true);
    for (mode, img, dev) in crate::crash_images(&fs, cut, &ro) {
        let what = format!("cut {cut} {mode:?}");
        let r = crate::assert_cut_checks_clean(dev.as_ref(), &what);
        if cut.is_multiple_of(3) && mode != CrashMode::DropUnflushed {
            crate::assert_qemu_check_agrees(path, &img, &r, &what);
        }
        let got = read_all(dev.as_ref());
        for (b, (g, d)) in got.chunks(BLOCK).zip(durable.chunks(BLOCK)).enumerate() {
            let off = (b * BLOCK) as u64;
            let ok = g == d
                || since
                    .iter()
                    .any(|&(o, v)| o == off && g.iter().all(|&x| x == v));
            assert!(
                ok,
                "cut {cut} {mode:?}: block at {off} holds neither old nor new data"
            );
        }
    }
}

fn crash_every_cut(every: usize) {
    let initial = image();
    let (fs, want, since) = run(&initial, None, every);
    assert!(since.is_empty() || !ops().len().is_multiple_of(every));
    let count = fs.ops();
    let dir = tempdir();
    let path = dir.path().join("crash.qcow2");
    // A clean run ends with no leaks: the reserve goes back at close.
    std::fs::write(&path, fs.crash_image(CrashMode::DropUnflushed)).unwrap();
    let (v, _) = qemu_check_json(&path, "qcow2");
    assert_eq!(v["leaks"].as_u64().unwrap_or(0), 0, "{v}");
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{v}");
    let dev = crate::open(&path, true);
    let mut model = want;
    for (o, b) in since {
        model[o as usize..o as usize + BLOCK].fill(b);
    }
    assert!(read_all(dev.as_ref()) == model);
    drop(dev);
    assert!(count > 40, "{count}");
    for cut in 0..count {
        check_cut(&initial, cut, every, &path);
    }
}

#[test]
fn crash_during_allocating_writes_flush_every_4() {
    crash_every_cut(4);
}

#[test]
fn crash_during_allocating_writes_flush_every_16() {
    crash_every_cut(16);
}

/// The reserve is used (one storage flush per guest flush after the first) and given
/// back at close (the file does not keep it).
#[test]
fn reserve_saves_flushes_and_is_returned_at_close() {
    let initial = image();
    let fs = Arc::new(FaultStorage::new(initial.clone(), None));
    let dev = DRIVER.open(fs.clone(), &OpenOptions::new()).unwrap();
    let mut flushes = Vec::new();
    for k in 0..32u64 {
        dev.write_at(&[7u8; BLOCK], k * CLUSTER).unwrap();
        if k % 8 == 7 {
            let before = fs.flushes();
            dev.flush().unwrap();
            flushes.push(fs.flushes() - before);
        }
    }
    // The first group orders its refcounts with a flush of its own; later ones use
    // clusters allocated ahead and need only the guest's.
    assert_eq!(flushes, vec![2, 1, 1, 1], "storage flushes per guest flush");
    dev.close().unwrap();
    let img = fs.crash_image(CrashMode::DropUnflushed);
    // 32 data clusters, the header, L1, refcount table and block, one L2 table: the
    // reserve left no tail behind.
    assert!(img.len() as u64 <= 37 * CLUSTER, "{}", img.len());
}
