//! The overwrite rows (issues 17/21/20): random 4 KiB writes into the allocated data
//! image (every cluster `COPIED`), on one thread and on two threads sharing one opened
//! image (each thread does half of the writes). qcow2 overwrites such clusters in place
//! under its shared metadata lock, so two threads' writes can be in flight at once.
//!
//! Engines: diskimg and imago through the page cache, and diskimg with `-t none`
//! (`O_DIRECT`), round by round in turn. `BENCH_OVERWRITES` writes per measurement
//! (default 100000). The writes are not flushed inside the timing (a flush after each
//! measurement writes them back before the next starts). They change the data image's
//! bytes, which the read rows do not look at.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskimg::blockio::{BlockDevice, CacheMode};
use diskimg::{Format, ImageOptions};

use crate::engines::{Engine, open_engine, wanted};
use crate::{
    BLOCK, Cfg, FLUSH_EVERY, Row, fresh_image, print_row, random_cluster_offsets, random_offsets,
};

/// `O_DIRECT` diskimg (`-t none`), for the rows beside the page-cache engines.
struct Direct(Arc<dyn BlockDevice>);

impl Engine for Direct {
    fn read(&self, buf: &mut [u8], off: u64) {
        self.0.read_at(buf, off).expect("diskimg read");
    }
    fn write(&self, buf: &[u8], off: u64) {
        self.0.write_at(buf, off).expect("diskimg write");
    }
    fn flush(&self) {
        self.0.flush().expect("diskimg flush");
    }
}

const DIRECT: &str = "diskimg -t none";

fn open(name: &str, path: &Path) -> Arc<dyn Engine> {
    if name == DIRECT {
        let opts = ImageOptions::read_only(false).with_cache(CacheMode::None);
        let img = diskimg::open(path, Some(Format::Qcow2), &opts).expect("diskimg open");
        return Arc::new(Direct(img.device));
    }
    open_engine(name, path, true)
}

/// Writes 4 KiB at each of `offs` on `threads` threads sharing `e`, each thread flushing
/// after every `flush_every` of its writes and at its end (`None`: never); the time taken.
fn writes(
    e: &Arc<dyn Engine>,
    offs: &[u64],
    threads: usize,
    flush_every: Option<usize>,
) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in offs.chunks(offs.len().div_ceil(threads)) {
            let e = e.clone();
            s.spawn(move || {
                let buf = vec![0x5au8; BLOCK as usize];
                for (i, &o) in part.iter().enumerate() {
                    e.write(&buf, o);
                    if flush_every.is_some_and(|n| (i + 1) % n == 0) {
                        e.flush();
                    }
                }
                if flush_every.is_some() {
                    e.flush();
                }
            });
        }
    });
    t.elapsed()
}

/// The overwrites, not flushed inside the timing (a flush after it).
fn run(e: &Arc<dyn Engine>, offs: &[u64], threads: usize) -> Duration {
    let took = writes(e, offs, threads, None);
    e.flush();
    took
}

/// `alloc-4k-rand-mt`: allocating writes on one and two threads sharing one fresh image
/// (diskimg, imago, diskimg `-t none`), round by round in turn (docs/benchmarks.md,
/// session 6: what dropping qcow2's lock during an allocation's data write did).
pub fn alloc_rows(cfg: &Cfg) {
    if !cfg.wants("alloc-4k-rand-mt") {
        return;
    }
    let offs = random_cluster_offsets(cfg.clusters(), 0x2545_f491_4f6c_dd1d);
    let mut cases = Vec::new();
    for threads in mt_threads() {
        for eng in ["diskimg", "imago 0.2.6", DIRECT] {
            if wanted(eng) {
                cases.push((eng, threads));
            }
        }
    }
    let mut best = vec![Duration::MAX; cases.len()];
    for _ in 0..cfg.rounds {
        for (b, &(eng, threads)) in best.iter_mut().zip(&cases) {
            let img = fresh_image(cfg);
            let e = open(eng, &img);
            *b = (*b).min(writes(&e, &offs, threads, Some(FLUSH_EVERY)));
        }
    }
    for (best, (eng, threads)) in best.into_iter().zip(cases) {
        print_row(&Row {
            name: "alloc-4k-rand-mt".into(),
            engine: eng.into(),
            ops: offs.len(),
            bytes: offs.len() as u64 * BLOCK,
            best,
            note: format!("{threads} thread(s), one device"),
        });
    }
}

/// The thread counts of `alloc-4k-rand-mt` (`BENCH_MT_THREADS`, comma-separated; default
/// `1,2`).
fn mt_threads() -> Vec<usize> {
    let v = std::env::var("BENCH_MT_THREADS").unwrap_or_default();
    let t: Vec<usize> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    if t.is_empty() { vec![1, 2] } else { t }
}

/// Prints the overwrite rows wanted (`BENCH_ONLY`, `BENCH_ENGINES`).
pub fn rows(cfg: &Cfg, data: &Path) {
    let n = std::env::var("BENCH_OVERWRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000usize);
    let offs = random_offsets(cfg.size, n, 0x2545_f491_4f6c_dd1d);
    let mut cases = Vec::new();
    for (name, threads) in [("overwrite-4k-rand", 1), ("overwrite-4k-rand-2t", 2)] {
        if !cfg.wants(name) {
            continue;
        }
        for eng in ["diskimg", "imago 0.2.6", DIRECT] {
            if wanted(eng) {
                cases.push((name, eng, threads));
            }
        }
    }
    let mut best = vec![Duration::MAX; cases.len()];
    for _ in 0..cfg.rounds {
        // One engine opens the image at a time (diskimg locks it for writing).
        for (b, &(_, eng, threads)) in best.iter_mut().zip(&cases) {
            *b = (*b).min(run(&open(eng, data), &offs, threads));
        }
    }
    for (best, (name, eng, threads)) in best.into_iter().zip(cases) {
        print_row(&Row {
            name: name.into(),
            engine: eng.into(),
            ops: n,
            bytes: n as u64 * BLOCK,
            best,
            note: format!("{threads} thread(s), one device"),
        });
    }
}
