//! The engine benchmark (issue 17): diskimg, imago 0.2.6 (`sync` feature) and
//! `qemu-img bench` on the same qcow2 images, in one process, printing one table.
//!
//! Run it with `benches/engine.sh` (which sets the knobs below and builds in release).
//! Environment:
//! - `BENCH_DIR` — where the images go (default `target/engine-bench`);
//! - `BENCH_SIZE_MIB` — virtual size of the read image (default 512);
//! - `BENCH_ALLOC_MIB` — virtual size of the fresh images the allocating writes fill, one
//!   4 KiB write per 64 KiB cluster (default 2048: 32768 writes, about 0.5 s a row; at
//!   512 a row lasted only 0.1 s and its ratio moved by ±10 % between runs). qemu-img
//!   bench -w fills whole clusters: its image takes this much disk space while it runs;
//! - `BENCH_READS` — 4 KiB reads per measurement of the `O_DIRECT` rows (io_uring,
//!   `qemu-img bench`; default 200000);
//! - `BENCH_CACHED_READS` — 4 KiB reads per measurement of the in-process page-cache rows
//!   (diskimg and imago `read-4k-*`; default 1000000: 200000 took only 0.1 s on a quiet
//!   machine, too short for stable ratios);
//! - `BENCH_ROUNDS` — rounds per measurement, the best is reported (default 3);
//! - `BENCH_ONLY` — comma-separated prefixes of the row names to run (default all; a
//!   name ending in `$` selects that row only, e.g. `alloc-4k-rand$` without `-mt`);
//! - `BENCH_ENGINES` — comma-separated prefixes of the engine column (`diskimg`, `imago`,
//!   `diskimg io_uring`, `qemu-img`, `qemu-img -d 16`, …; default every row);
//! - `BENCH_EXTRA` — more diskimg rows with driver options, `;`-separated, e.g.
//!   `diskimg x-write-behind=off` (an A/B row run in the same rounds; `engines.rs`);
//! - `BENCH_MT_THREADS` — thread counts of `alloc-4k-rand-mt` (default `1,2`);
//! - `BENCH_URING_PLUG=1`, `BENCH_URING_PARK=std` — variants of the io_uring row's
//!   driver (`benches/engine/uring.rs`).
//!
//! Patterns (the same for every engine):
//! - `seq-read-1m`: the whole image in 1 MiB reads;
//! - `read-4k-stride`: qemu-img bench's pattern with a step of 7919 blocks (offset +=
//!   step, modulo size - 4 KiB): scattered 4 KiB reads of allocated data;
//! - `read-4k-rand[-2t]`: xorshift-random 4 KiB reads, on one and two threads sharing one
//!   opened image (each thread does half of the reads);
//! - `alloc-4k-stride`: into a fresh image, one 4 KiB write at the start of every 64 KiB
//!   cluster in order (qemu-img bench -w -S 65536), a flush every 256 writes;
//! - `alloc-4k-rand`: the same clusters in random order, at a random 4 KiB inside each;
//! - `overwrite-4k-rand[-2t]`: random 4 KiB writes into the allocated data image, on one
//!   and two threads sharing one opened image (`benches/engine/overwrite.rs`);
//! - `alloc-4k-rand-mt`: `alloc-4k-rand` on one and on two threads sharing one fresh image
//!   (each thread half of the writes, flushing after every 256 of its own).
//!
//! - `read-4k-stride` / `read-4k-rand` with engine `diskimg io_uring -d 16 -t none`: the
//!   same offsets through the library's async face on an io_uring of depth 16 with
//!   `O_DIRECT`, 16 reads in flight from one thread (`benches/engine/uring.rs`).
//!
//! `qemu-img bench` runs the stride patterns with `-d 1` (and the read with `-d 16 -t none`,
//! with qemu's default thread pool and with `-i io_uring`). The `O_DIRECT` and `qemu-img
//! bench` read rows run round by round in turn, and so do the engines of every other row
//! (the device or the CPUs, shared with whatever else the machine does, set their pace: a
//! disturbance then hits each of them alike).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod engines;
mod overwrite;
mod uring;

use engines::{Engine, open_engine, wanted};

const BLOCK: u64 = 4096;
const CLUSTER: u64 = 65536;
const STRIDE_BLOCKS: u64 = 7919;
const FLUSH_EVERY: usize = 256;

/// Benchmark settings from the environment.
struct Cfg {
    dir: PathBuf,
    size: u64,
    alloc_size: u64,
    reads: usize,
    cached_reads: usize,
    rounds: usize,
    only: Option<Vec<String>>,
}

impl Cfg {
    fn from_env() -> Self {
        let num = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let dir = std::env::var_os("BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/engine-bench"));
        Self {
            dir,
            size: num("BENCH_SIZE_MIB", 512) << 20,
            alloc_size: num("BENCH_ALLOC_MIB", 2048).max(1) << 20,
            reads: usize::try_from(num("BENCH_READS", 200_000)).unwrap_or(200_000),
            cached_reads: usize::try_from(num("BENCH_CACHED_READS", 1_000_000))
                .unwrap_or(1_000_000),
            rounds: usize::try_from(num("BENCH_ROUNDS", 3)).unwrap_or(3).max(1),
            only: std::env::var("BENCH_ONLY")
                .ok()
                .map(|s| s.split(',').map(str::to_string).collect()),
        }
    }

    fn wants(&self, row: &str) -> bool {
        self.only.as_ref().is_none_or(|o| {
            o.iter().any(|x| match x.strip_suffix('$') {
                Some(exact) => row == exact,
                None => row.starts_with(x.as_str()),
            })
        })
    }

    /// Clusters of the fresh images (one allocating write each).
    fn clusters(&self) -> u64 {
        self.alloc_size / CLUSTER
    }
}

/// qemu-img bench's offsets: start at 0, add `step`, wrap modulo `size - bufsize`.
fn stride_offsets(size: u64, step: u64, count: usize) -> Vec<u64> {
    let modulo = size - BLOCK;
    let mut off = 0u64;
    (0..count)
        .map(|_| {
            let o = off;
            off = (off + step) % modulo;
            o
        })
        .collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn random_offsets(size: u64, count: usize, seed: u64) -> Vec<u64> {
    let mut r = Rng(seed | 1);
    (0..count)
        .map(|_| r.next() % (size / BLOCK) * BLOCK)
        .collect()
}

/// Every cluster once, in random order, at a random 4 KiB block inside it.
fn random_cluster_offsets(clusters: u64, seed: u64) -> Vec<u64> {
    let mut r = Rng(seed | 1);
    let mut v: Vec<u64> = (0..clusters).collect();
    for i in (1..v.len()).rev() {
        let j = usize::try_from(r.next() % (i as u64 + 1)).unwrap_or(0);
        v.swap(i, j);
    }
    v.into_iter()
        .map(|c| c * CLUSTER + r.next() % (CLUSTER / BLOCK) * BLOCK)
        .collect()
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fully allocated qcow2 image of random data (made once, by qemu-img convert).
fn data_image(cfg: &Cfg) -> PathBuf {
    let img = cfg.dir.join(format!("data-{}m.qcow2", cfg.size >> 20));
    if img.exists() {
        return img;
    }
    let raw = cfg.dir.join("data.raw");
    sh(Command::new("dd")
        .arg("if=/dev/urandom")
        .arg(format!("of={}", raw.display()))
        .arg("bs=1M")
        .arg(format!("count={}", cfg.size >> 20))
        .arg("status=none"));
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img));
    let _ = std::fs::remove_file(raw);
    img
}

fn fresh_image(cfg: &Cfg) -> PathBuf {
    let img = cfg.dir.join("fresh.qcow2");
    let _ = std::fs::remove_file(&img);
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(cfg.alloc_size.to_string()));
    img
}

/// Reads `offs` (each `len` bytes) on `threads` threads sharing `e`.
fn run_reads(e: &Arc<dyn Engine>, offs: &[u64], len: usize, threads: usize) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in offs.chunks(offs.len().div_ceil(threads)) {
            let e = e.clone();
            s.spawn(move || {
                let mut buf = vec![0u8; len];
                for &o in part {
                    e.read(&mut buf, o);
                }
            });
        }
    });
    t.elapsed()
}

fn run_writes(e: &dyn Engine, offs: &[u64]) -> Duration {
    let buf = vec![0x5au8; BLOCK as usize];
    let t = Instant::now();
    for (i, &o) in offs.iter().enumerate() {
        e.write(&buf, o);
        if (i + 1) % FLUSH_EVERY == 0 {
            e.flush();
        }
    }
    e.flush();
    t.elapsed()
}

/// `qemu-img bench` with `args`; the time it reports.
fn qemu_bench(img: &Path, args: &[&str]) -> Duration {
    let out = sh(Command::new("qemu-img")
        .args(["bench", "-f", "qcow2"])
        .args(args)
        .arg(img));
    let secs = out
        .split("completed in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("unexpected qemu-img bench output: {out}"));
    Duration::from_secs_f64(secs)
}

/// One table row: the best of `rounds` timings of `ops` operations.
struct Row {
    name: String,
    engine: String,
    ops: usize,
    bytes: u64,
    best: Duration,
    note: String,
}

fn print_row(r: &Row) {
    let s = r.best.as_secs_f64();
    println!(
        "{:<18} {:<34} {:>10.0} {:>9.1} {:>8.3}  {}",
        r.name,
        r.engine,
        r.ops as f64 / s,
        r.bytes as f64 / s / f64::from(1 << 20),
        s,
        r.note
    );
}

fn allocated_mib(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .map(|m| format!("{} MiB on disk", (m.blocks() * 512) >> 20))
        .unwrap_or_default()
}

/// This process's `write_bytes` (bytes it sent towards the storage, counted when page
/// cache pages are dirtied) and `syscw` (write-type system calls), from `/proc/self/io`.
fn proc_io() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("write_bytes:"), field("syscw:"))
}

/// The extents of `p` as `filefrag` counts them (empty when it is not installed).
fn extents(p: &Path) -> String {
    Command::new("filefrag")
        .arg(p)
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            let n = s
                .rsplit(": ")
                .next()?
                .split_whitespace()
                .next()?
                .to_string();
            Some(format!(", {n} extents"))
        })
        .unwrap_or_default()
}

/// One allocating run of engine `eng` on a fresh image: its time and a note (space on
/// disk, bytes dirtied and write calls per flush group of the run, extents at the end).
fn alloc_round(cfg: &Cfg, eng: &str, offs: &[u64]) -> (Duration, String) {
    let img = fresh_image(cfg);
    let e = open_engine(eng, &img, true);
    let (wb0, sc0) = proc_io();
    let t = run_writes(e.as_ref(), offs);
    let (wb1, sc1) = proc_io();
    drop(e);
    let groups = offs.len().div_ceil(FLUSH_EVERY).max(1) as u64;
    let note = format!(
        "{}, {} KiB dirtied and {} writes per flush group{}",
        allocated_mib(&img),
        ((wb1 - wb0) / groups) >> 10,
        (sc1 - sc0) / groups,
        extents(&img)
    );
    (t, note)
}

fn main() {
    let cfg = Cfg::from_env();
    std::fs::create_dir_all(&cfg.dir).expect("bench dir");
    println!(
        "{:<18} {:<34} {:>10} {:>9} {:>8}  note",
        "pattern", "engine", "ops/s", "MiB/s", "secs"
    );
    let engines = engines::names();
    let data = data_image(&cfg);
    let n = cfg.reads;
    let seq: Vec<u64> = (0..cfg.size >> 20).map(|i| i << 20).collect();
    let stride = stride_offsets(cfg.size, STRIDE_BLOCKS * BLOCK, n);
    let rand = random_offsets(cfg.size, n, 0x9e37_79b9_7f4a_7c15);
    // The same patterns, longer, for the page-cache rows (`BENCH_CACHED_READS`).
    let c = cfg.cached_reads;
    let stride_c = stride_offsets(cfg.size, STRIDE_BLOCKS * BLOCK, c);
    let rand_c = random_offsets(cfg.size, c, 0x9e37_79b9_7f4a_7c15);
    type ReadCase<'a> = (&'a str, &'a [u64], usize, usize);
    let reads: [ReadCase; 4] = [
        ("seq-read-1m", &seq, 1 << 20, 1),
        ("read-4k-stride", &stride_c, BLOCK as usize, 1),
        ("read-4k-rand", &rand_c, BLOCK as usize, 1),
        ("read-4k-rand-2t", &rand_c, BLOCK as usize, 2),
    ];
    // The engines of a page-cache row, too, run round by round in turn: the CPUs are
    // shared with other work whose load changes between rounds.
    for (name, offs, len, threads) in reads {
        if !cfg.wants(name) {
            continue;
        }
        let cases = engines
            .iter()
            .map(|&eng| {
                let e = open_engine(eng, &data, false);
                Case {
                    name,
                    engine: eng.into(),
                    ops: offs.len(),
                    bytes: offs.len() as u64 * len as u64,
                    run: Box::new(move || run_reads(&e, offs, len, threads)),
                }
            })
            .collect();
        interleaved(cfg.rounds, cases);
    }
    // The O_DIRECT rows (the device, which other work shares, sets their pace) run
    // round by round in turn, so that a disturbance hits all of them alike.
    let ring = "diskimg io_uring -d 16 -t none";
    let mut cases = Vec::new();
    for (name, offs) in [("read-4k-stride", &stride), ("read-4k-rand", &rand)] {
        if cfg.wants(name) && wanted(ring) {
            let data = &data;
            cases.push(Case {
                name,
                engine: ring.into(),
                ops: offs.len(),
                bytes: offs.len() as u64 * BLOCK,
                run: Box::new(move || uring::reads(data, offs, BLOCK as usize, 16)),
            });
        }
    }
    cases.extend(qemu_reads(&cfg, &data));
    interleaved(cfg.rounds, cases);
    overwrite::rows(&cfg, &data);
    let strided: Vec<u64> = (0..cfg.clusters()).map(|c| c * CLUSTER).collect();
    let shuffled = random_cluster_offsets(cfg.clusters(), 0x2545_f491_4f6c_dd1d);
    for (name, offs) in [("alloc-4k-stride", &strided), ("alloc-4k-rand", &shuffled)] {
        if !cfg.wants(name) {
            continue;
        }
        // Engines in turn, round by round (the disk's pace varies with other work).
        let mut times = vec![Vec::new(); engines.len()];
        let mut notes = vec![String::new(); engines.len()];
        for _ in 0..cfg.rounds {
            for (i, &eng) in engines.iter().enumerate() {
                let (t, note) = alloc_round(&cfg, eng, offs);
                times[i].push(t);
                notes[i] = note;
            }
        }
        for ((&eng, mut t), note) in engines.iter().zip(times).zip(notes) {
            t.sort();
            let median = t[t.len() / 2];
            let ops = offs.len();
            print_row(&Row {
                name: name.into(),
                engine: eng.into(),
                ops,
                bytes: ops as u64 * BLOCK,
                best: t[0],
                note: format!(
                    "median {:.0} ops/s; {note}",
                    ops as f64 / median.as_secs_f64()
                ),
            });
        }
    }
    qemu_writes(&cfg);
    overwrite::alloc_rows(&cfg);
    // The fresh images are large at the default size: only the read image is kept.
    let _ = std::fs::remove_file(cfg.dir.join("fresh.qcow2"));
}

/// One timed case of [`interleaved`]: a row and how to measure it once.
struct Case<'a> {
    name: &'a str,
    engine: String,
    ops: usize,
    bytes: u64,
    run: Box<dyn Fn() -> Duration + 'a>,
}

/// Runs `cases` round by round in turn and prints the best of each.
fn interleaved(rounds: usize, cases: Vec<Case<'_>>) {
    let mut best = vec![Duration::MAX; cases.len()];
    for _ in 0..rounds {
        for (b, c) in best.iter_mut().zip(&cases) {
            *b = (*b).min((c.run)());
        }
    }
    for (best, c) in best.into_iter().zip(cases) {
        print_row(&Row {
            name: c.name.into(),
            engine: c.engine,
            ops: c.ops,
            bytes: c.bytes,
            best,
            note: String::new(),
        });
    }
}

/// The `qemu-img bench` read rows wanted.
fn qemu_reads<'a>(cfg: &Cfg, data: &'a Path) -> Vec<Case<'a>> {
    let n = cfg.reads.to_string();
    let step = (STRIDE_BLOCKS * BLOCK).to_string();
    let mib = (cfg.size >> 20).to_string();
    let cases: [(&str, &str, Vec<&str>, usize, u64); 4] = [
        (
            "seq-read-1m",
            "qemu-img bench -d 1",
            vec!["-c", &mib, "-d", "1", "-s", "1M", "-S", "1M"],
            usize::try_from(cfg.size >> 20).unwrap_or(0),
            1 << 20,
        ),
        (
            "read-4k-stride",
            "qemu-img bench -d 1",
            vec!["-c", &n, "-d", "1", "-s", "4K", "-S", &step],
            cfg.reads,
            BLOCK,
        ),
        (
            "read-4k-stride",
            "qemu-img -d 16 -t none",
            vec!["-c", &n, "-d", "16", "-t", "none", "-s", "4K", "-S", &step],
            cfg.reads,
            BLOCK,
        ),
        (
            "read-4k-stride",
            "qemu-img -d 16 -t none -i io_uring",
            vec![
                "-c", &n, "-d", "16", "-t", "none", "-i", "io_uring", "-s", "4K", "-S", &step,
            ],
            cfg.reads,
            BLOCK,
        ),
    ];
    cases
        .into_iter()
        .filter(|&(name, engine, ..)| cfg.wants(name) && wanted(engine))
        .map(|(name, engine, args, ops, len)| {
            let args: Vec<String> = args.into_iter().map(str::to_string).collect();
            Case {
                name,
                engine: engine.into(),
                ops,
                bytes: ops as u64 * len,
                run: Box::new(move || {
                    let a: Vec<&str> = args.iter().map(String::as_str).collect();
                    qemu_bench(data, &a)
                }),
            }
        })
        .collect()
}

fn qemu_writes(cfg: &Cfg) {
    let engine = "qemu-img bench -w -d 1";
    if !cfg.wants("alloc-4k-stride") || !wanted(engine) {
        return;
    }
    let count = cfg.clusters().to_string();
    let args = [
        "-w",
        "-c",
        &count,
        "-d",
        "1",
        "-s",
        "4K",
        "-S",
        "64K",
        "--flush-interval=256",
    ];
    let mut best = Duration::MAX;
    let mut note = String::new();
    for _ in 0..cfg.rounds {
        let img = fresh_image(cfg);
        best = best.min(qemu_bench(&img, &args));
        note = allocated_mib(&img);
    }
    print_row(&Row {
        name: "alloc-4k-stride".into(),
        engine: engine.into(),
        ops: usize::try_from(cfg.clusters()).unwrap_or(0),
        bytes: cfg.clusters() * BLOCK,
        best,
        note,
    });
}
