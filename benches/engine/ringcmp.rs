//! Which io_uring crate (issue 17): diskimg's ring (the `io-uring` crate under
//! `blockio::Uring`, reached through the library: raw image, layout walk, async face)
//! against tokio-uring 0.4 on the same file and offsets: random 4 KiB reads, 16 in
//! flight, page-cached (both rings then do the same kernel work; what differs is the
//! submission and completion machinery). tokio-uring's buffers must be `IoBufMut`
//! (an `unsafe` trait), so its `O_DIRECT` run is left out rather than written with
//! `unsafe`.
//!
//! Run: `cargo bench --manifest-path benches/engine/Cargo.toml --bench ringcmp`
//! (`BENCH_DIR`, `BENCH_READS`, `BENCH_ROUNDS` as for `engine.rs`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use diskimg::blockio::{AsyncDevice, IoBuf, IoFuture};
use diskimg::{Format, ImageOptions};

const DEPTH: usize = 16;
const SIZE_MIB: u64 = 128;

fn env(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn diskimg_reads(path: &Path, offs: &[u64]) -> Duration {
    let opts = ImageOptions::read_only(true)
        .with_io_uring(DEPTH)
        .expect("io_uring");
    let img = diskimg::open(path, Some(Format::Raw), &opts).expect("open");
    let aio = AsyncDevice::with_workers(img.device.clone(), 1).expect("async face");
    let mut free: Vec<IoBuf> = (0..DEPTH).map(|_| IoBuf::new(4096)).collect();
    let mut q: VecDeque<IoFuture<IoBuf>> = VecDeque::with_capacity(DEPTH);
    let t = Instant::now();
    for &o in offs {
        if q.len() == DEPTH {
            free.push(pollster::block_on(q.pop_front().expect("queued")).expect("read"));
        }
        q.push_back(aio.read_at(free.pop().expect("buffer"), o));
    }
    for f in q {
        pollster::block_on(f).expect("read");
    }
    t.elapsed()
}

fn tokio_uring_reads(path: &Path, offs: &[u64]) -> Duration {
    tokio_uring::start(async {
        let f = Rc::new(tokio_uring::fs::File::open(path).await.expect("open"));
        let t = Instant::now();
        let tasks: Vec<_> = offs
            .chunks(offs.len().div_ceil(DEPTH))
            .map(|part| {
                let (f, part) = (f.clone(), part.to_vec());
                tokio_uring::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for o in part {
                        let (r, b) = f.read_at(buf, o).await;
                        assert_eq!(r.expect("read"), 4096);
                        buf = b;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        t.elapsed()
    })
}

fn main() {
    let dir = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/engine-bench"));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let file = dir.join("ringcmp.raw");
    if !file.exists() {
        let st = Command::new("dd")
            .arg("if=/dev/urandom")
            .arg(format!("of={}", file.display()))
            .args(["bs=1M", &format!("count={SIZE_MIB}"), "status=none"])
            .status()
            .expect("dd");
        assert!(st.success());
    }
    let n = env("BENCH_READS", 200_000);
    let rounds = env("BENCH_ROUNDS", 3).max(1);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let offs: Vec<u64> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % (SIZE_MIB * 256) * 4096
        })
        .collect();
    let mut best = [Duration::MAX; 2];
    for _ in 0..rounds {
        best[0] = best[0].min(diskimg_reads(&file, &offs));
        best[1] = best[1].min(tokio_uring_reads(&file, &offs));
    }
    println!(
        "{:<44} {:>10}",
        "random 4 KiB reads, 16 in flight, cached", "ops/s"
    );
    for (name, d) in [
        ("diskimg (io-uring crate, async face)", best[0]),
        ("tokio-uring 0.4", best[1]),
    ] {
        println!("{name:<44} {:>10.0}", n as f64 / d.as_secs_f64());
    }
}
