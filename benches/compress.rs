//! Compression backends for compressed clusters, measured on the same 64 KiB clusters:
//! raw deflate from miniz_oxide and from flate2 (zlib-rs backend) at the same level,
//! flate2 with qemu's 4 KiB window (what qcow2 zlib clusters must use: qemu inflates
//! with windowBits -12), and zstd at several levels.
//!
//! The sample is real data: the first 8 MiB of the regular files under
//! `$BENCH_SAMPLE_DIR` (default `/usr/share/doc` then `/usr/bin`, sorted by path), so
//! text and binaries mix as on a system disk. Throughput is per input byte; the
//! compressed/input ratio of each backend is printed once before its measurements.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flate2::{Compress, Compression, FlushCompress};

const CLUSTER: usize = 64 << 10;
const SAMPLE: usize = 8 << 20;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            files(&p, out);
        } else if md.is_file() {
            out.push(p);
        }
    }
}

fn sample() -> Vec<u8> {
    let dirs = std::env::var("BENCH_SAMPLE_DIR")
        .map(|d| vec![PathBuf::from(d)])
        .unwrap_or_else(|_| vec!["/usr/share/doc".into(), "/usr/bin".into()]);
    let mut out = Vec::new();
    for d in dirs {
        let mut list = Vec::new();
        files(&d, &mut list);
        // Half of the sample from each directory.
        let cap = out.len() + SAMPLE / 2;
        for f in list {
            if out.len() >= cap {
                break;
            }
            if let Ok(b) = std::fs::read(&f) {
                out.extend_from_slice(&b);
            }
        }
    }
    out.truncate(SAMPLE);
    out.resize(SAMPLE / CLUSTER * CLUSTER, 0x5a);
    out
}

fn flate2_raw(level: u32, window_bits: u8, input: &[u8], out: &mut Vec<u8>) -> usize {
    let mut c = Compress::new_with_window_bits(Compression::new(level), false, window_bits);
    out.clear();
    out.reserve(input.len() + 1024);
    c.compress_vec(input, out, FlushCompress::Finish).unwrap();
    out.len()
}

fn miniz_raw(level: u8, input: &[u8]) -> usize {
    miniz_oxide::deflate::compress_to_vec(input, level).len()
}

fn zstd_level(level: i32, input: &[u8]) -> usize {
    zstd::bulk::compress(input, level).unwrap().len()
}

type Backend = (String, Box<dyn Fn(&[u8], &mut Vec<u8>) -> usize>);

fn backends() -> Vec<Backend> {
    let mut v: Vec<Backend> = Vec::new();
    for level in [1u32, 6] {
        v.push((
            format!("miniz_oxide-raw-l{level}-w15"),
            Box::new(move |i, _| miniz_raw(u8::try_from(level).unwrap(), i)),
        ));
        v.push((
            format!("flate2-zlib-rs-raw-l{level}-w15"),
            Box::new(move |i, o| flate2_raw(level, 15, i, o)),
        ));
        v.push((
            format!("flate2-zlib-rs-raw-l{level}-w12"),
            Box::new(move |i, o| flate2_raw(level, 12, i, o)),
        ));
    }
    for level in [1i32, 3, 6, 9] {
        v.push((
            format!("zstd-l{level}"),
            Box::new(move |i, _| zstd_level(level, i)),
        ));
    }
    v
}

fn bench(c: &mut Criterion) {
    let data = sample();
    let mut g = c.benchmark_group("compress-64k-clusters");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(3));
    let mut scratch = Vec::new();
    for (name, f) in backends() {
        let total: usize = data.chunks(CLUSTER).map(|cl| f(cl, &mut scratch)).sum();
        println!(
            "ratio {name}: {:.4} ({total} of {} bytes)",
            total as f64 / data.len() as f64,
            data.len()
        );
        g.bench_function(&name, |b| {
            b.iter(|| {
                data.chunks(CLUSTER)
                    .map(|cl| f(cl, &mut scratch))
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
