//! Every verb, in-process, on the hostile corpus (`diskimg_testutil::hostile`): the named
//! cases (CVE images, qemu-iotests' corrupt images, loops, huge tables, FIFOs, symbolic
//! links), truncations at every structure boundary and proptest-driven mutants of each
//! format. Each must end in a clean error or in the data qemu reads; nothing may panic,
//! hang or allocate without bound, and `inspect` may call no hostile case safe.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use diskimg::blockio::{RepairMode, Storage};
use diskimg::{
    BlockDevice, Format, ImageOptions, InspectOptions, OpenPolicy, Verdict, block_status, inspect,
    inspect_storage, open, open_storage,
};
use diskimg_testutil::hostile::{self, Case, Mutator, truncations};
use diskimg_testutil::tempdir;
use proptest::prelude::*;

/// Guest sizes up to this are read in full and compared with qemu.
const READ_LIMIT: u64 = 256 << 20;

/// Runs `f` on a thread; fails if it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: did not finish in {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked (above)"),
    }
}

/// map (through `block_status`, bounded) and check.
fn map_and_check(dev: &dyn BlockDevice) {
    let size = dev.virtual_size();
    let mut pos = 0;
    for _ in 0..100_000 {
        if pos >= size {
            break;
        }
        match block_status(dev, pos, size - pos) {
            Ok(e) => {
                assert!(e.length > 0, "empty map entry at {pos}");
                pos += e.length;
            }
            Err(_) => break,
        }
    }
    let _ = dev.check(RepairMode::None);
}

/// Reads the whole guest (bounded sizes), or `None` at the first error.
fn read_guest(dev: &dyn BlockDevice) -> Option<Vec<u8>> {
    let size = dev.virtual_size();
    if size > READ_LIMIT {
        let mut b = vec![0u8; 65536];
        let _ = dev.read_at(&mut b, 0);
        return None;
    }
    let mut out = vec![0u8; usize::try_from(size).ok()?];
    for (i, chunk) in out.chunks_mut(4 << 20).enumerate() {
        dev.read_at(chunk, i as u64 * (4 << 20)).ok()?;
    }
    Some(out)
}

/// qemu's guest bytes (`qemu-img convert -O raw`, 20 s at most), if qemu reads it.
fn qemu_guest(path: &Path, fmt: &str, dir: &Path) -> Option<Vec<u8>> {
    let out = dir.join("qemu.raw");
    let st = std::process::Command::new("timeout")
        .args(["20", "qemu-img", "convert", "-U", "-f", fmt, "-O", "raw"])
        .arg(path)
        .arg(&out)
        .output()
        .expect("run qemu-img");
    let bytes = st
        .status
        .success()
        .then(|| std::fs::read(&out).ok())
        .flatten();
    let _ = std::fs::remove_file(&out);
    bytes
}

/// Every verb on one named case.
fn run_case(c: &Case, scratch: &Path) {
    let fmt = Format::from_name(c.format).ok();
    let mut references = false;
    for declared in [None, fmt] {
        let r = inspect(&c.path, &InspectOptions::default().with_format(declared)).unwrap();
        references |= !r.references.is_empty();
        if c.hostile {
            assert_ne!(
                r.verdict,
                Verdict::Safe,
                "{} ({}) as {declared:?}",
                c.name,
                c.what
            );
        } else {
            assert_eq!(r.verdict, Verdict::Safe, "{}: {:?}", c.name, r.findings);
        }
    }
    let Some(fmt) = fmt else { return };
    let opts = ImageOptions::read_only(true).with_policy(OpenPolicy::qemu_compatible());
    if let Ok(img) = open(&c.path, Some(fmt), &opts.clone().with_metadata_only(true)) {
        let _ = img.device.info();
    }
    let Ok(img) = open(&c.path, Some(fmt), &opts) else {
        return;
    };
    map_and_check(img.device.as_ref());
    // With references, qemu reads files we refuse (the CVEs): no common ground.
    if let Some(ours) = read_guest(img.device.as_ref())
        && !references
        && let Some(theirs) = qemu_guest(&c.path, c.format, scratch)
    {
        assert!(
            ours == theirs,
            "{} ({}): we read other data than qemu",
            c.name,
            c.what
        );
    }
}

#[test]
fn every_verb_on_the_named_corpus() {
    let dir = tempdir();
    let cases = hostile::build(dir.path());
    assert!(cases.len() > 60, "{} cases", cases.len());
    for c in cases {
        let scratch = dir.path().to_path_buf();
        let what = format!("{} ({})", c.name, c.what);
        within(60, &what, move || run_case(&c, &scratch));
    }
}

/// Every verb on bytes in memory (no other file reachable); `both` inspects probed as
/// well as declared.
fn exercise(fmt: &'static str, storage: Arc<dyn Storage>, both: bool) {
    let format = Format::from_name(fmt).ok();
    let _ = inspect_storage(
        storage.clone(),
        &InspectOptions::default().with_format(format),
    );
    if both {
        let _ = inspect_storage(storage.clone(), &InspectOptions::default());
    }
    let _ = diskimg::probe(storage.as_ref());
    if let Ok(dev) = open_storage(storage, format, true) {
        let _ = dev.info();
        map_and_check(dev.as_ref());
        let mut b = vec![0u8; 64 << 10];
        let size = dev.virtual_size();
        for off in [0, 1 << 20, size / 2, size.saturating_sub(64 << 10)] {
            let n = (size - off.min(size)).min(64 << 10) as usize;
            let _ = dev.read_at(&mut b[..n], off);
        }
    }
}

#[test]
fn truncations_at_every_structure_boundary() {
    let dir = tempdir();
    for (fmt, base) in hostile::bases(dir.path()) {
        let lens = truncations(&base);
        let m = Mutator::new(base);
        within(120, fmt, move || {
            for len in lens {
                exercise(fmt, Arc::new(m.truncated(len)), true);
            }
        });
    }
}

/// Mutants per format: `DISKIMG_MUTANTS` (default 10 000) per base image, each base
/// stopping early after `DISKIMG_MUTANT_SECS` seconds (default 30) so CI time stays
/// bounded (the count reached is printed).
#[test]
fn mutants_of_each_format() {
    let dir = tempdir();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let count = env("DISKIMG_MUTANTS").unwrap_or(10_000);
    let secs = env("DISKIMG_MUTANT_SECS").unwrap_or(30);
    for (fmt, base) in hostile::bases(dir.path()) {
        let m = Mutator::new(base);
        let start = Instant::now();
        let done = std::cell::Cell::new(0u64);
        let cfg = ProptestConfig {
            cases: u32::try_from(count).unwrap_or(u32::MAX),
            failure_persistence: None,
            max_shrink_iters: 200,
            ..ProptestConfig::default()
        };
        let mut runner = proptest::test_runner::TestRunner::new(cfg);
        let strat = proptest::collection::vec((any::<u32>(), 0u8..5, any::<u64>()), 1..7);
        let result = runner.run(&strat, |muts| {
            if start.elapsed() > Duration::from_secs(secs) {
                return Ok(());
            }
            let mut mutant = m.mutant(&muts);
            // Half the mutants get their checksums fixed so they reach past them.
            if muts.first().is_some_and(|x| x.2 & 0x200 != 0) {
                mutant.fix_checksums(fmt);
            }
            exercise(fmt, Arc::new(mutant), false);
            done.set(done.get() + 1);
            Ok(())
        });
        result.unwrap_or_else(|e| panic!("{fmt}: {e}"));
        let t = start.elapsed().as_secs_f64();
        eprintln!("{fmt}: {} mutants in {t:.1} s", done.get());
    }
}
