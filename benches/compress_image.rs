//! Deflate settings for compressed clusters, measured on the data clusters of a real
//! disk image: for each setting, the compressed size (a cluster that does not shrink is
//! counted whole, as qcow2 stores it plainly) and the CPU time on one thread.
//!
//! `cargo bench --bench compress_image` reads `$BENCH_IMAGE` (default
//! `target/bench-input/ext4-4G.raw`, the input `benches/compare-qemu.sh` builds: a
//! 4 GiB ext4 image of /usr/share), skips all-zero 64 KiB clusters (convert never
//! compresses them) and takes `$BENCH_MIB` MiB (default 256) of the rest, evenly spread.
//! Rows: a fresh compressor per cluster (as before) or one reset per cluster; with and
//! without the [`looks_incompressible`] pre-check; levels 2, 3 and 6 (qemu's) with
//! qcow2's 4 KiB window (`w12`) and VMDK's 32 KiB one (`w15`). CPU time is the thread's
//! user + system time (`/proc/thread-self/stat`, 10 ms ticks), which a loaded machine
//! stretches far less than wall time.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use diskimg_blockio::looks_incompressible;
use flate2::{Compress, Compression, FlushCompress, Status};

const CLUSTER: usize = 64 << 10;

/// User + system seconds of this thread.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

struct Setting {
    name: &'static str,
    level: u32,
    window_bits: u8,
    reuse: bool,
    skip: bool,
}

/// Compressed bytes of `clusters` under `s`, and clusters stored plainly.
fn run(s: &Setting, clusters: &[&[u8]]) -> (usize, usize) {
    let new = || Compress::new_with_window_bits(Compression::new(s.level), false, s.window_bits);
    let mut c = new();
    let mut out = Vec::with_capacity(CLUSTER);
    let (mut total, mut plain) = (0, 0);
    for cl in clusters {
        if s.skip && looks_incompressible(cl) {
            total += CLUSTER;
            plain += 1;
            continue;
        }
        if s.reuse {
            c.reset();
        } else {
            c = new();
        }
        out.clear();
        let st = c.compress_vec(cl, &mut out, FlushCompress::Finish).unwrap();
        if st == Status::StreamEnd && out.len() < CLUSTER {
            total += out.len();
        } else {
            total += CLUSTER;
            plain += 1;
        }
    }
    (total, plain)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would run this too: only
    // measure when asked to.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let path = std::env::var("BENCH_IMAGE").unwrap_or("target/bench-input/ext4-4G.raw".into());
    let mib: usize = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let Ok(image) = std::fs::read(&path) else {
        eprintln!("cannot read {path}: run benches/compare-qemu.sh once, or set BENCH_IMAGE");
        return;
    };
    let data: Vec<&[u8]> = image
        .chunks_exact(CLUSTER)
        .filter(|c| c.iter().any(|&b| b != 0))
        .collect();
    let step = (data.len() * CLUSTER / (mib << 20)).max(1);
    let clusters: Vec<&[u8]> = data.iter().copied().step_by(step).collect();
    let bytes = clusters.len() * CLUSTER;
    println!(
        "# {path}: {} data clusters, measuring {} ({} MiB)",
        data.len(),
        clusters.len(),
        bytes >> 20
    );
    println!("| setting | ratio | plain clusters | CPU s | MiB/s per core |");
    println!("|---|---|---|---|---|");
    let settings = [
        ("fresh l3 w12 (before)", 3, 12, false, false),
        ("reset l3 w12", 3, 12, true, false),
        ("reset+skip l3 w12 (qcow2 now)", 3, 12, true, true),
        ("reset+skip l2 w12", 2, 12, true, true),
        ("reset l6 w12 (qemu's level)", 6, 12, true, false),
        ("fresh l3 w15 (VMDK before)", 3, 15, false, false),
        ("reset+skip l3 w15 (VMDK now)", 3, 15, true, true),
        ("reset l6 w15 (qemu's level)", 6, 15, true, false),
    ];
    for (name, level, window_bits, reuse, skip) in settings {
        let s = Setting {
            name,
            level,
            window_bits,
            reuse,
            skip,
        };
        let t = cpu_seconds();
        let (total, plain) = run(&s, &clusters);
        let cpu = cpu_seconds() - t;
        println!(
            "| {} | {:.4} | {plain} | {cpu:.2} | {:.0} |",
            s.name,
            total as f64 / bytes as f64,
            bytes as f64 / 1048576.0 / cpu.max(0.01)
        );
    }
}
