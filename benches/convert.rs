//! Criterion benches of diskimg-convert on in-memory devices: raw→raw of a sparse image
//! (mostly holes) and a dense one, sequential and with 4 worker threads; and compressed
//! conversion (`-c`) of text-like data into qcow2 (zlib, zstd) and streamOptimized vmdk.
#![allow(missing_docs)]

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diskimg::blockio::{CreateRequest, MemStorage, OptionList, Storage};
use diskimg::{BlockDevice, Format};
use diskimg_convert::{ConvertOptions, convert, is_zero, zero_runs};

const SIZE: usize = 32 << 20;

fn device(bytes: Vec<u8>) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
    diskimg::open_storage(s, Some(Format::Raw), false).expect("open raw")
}

/// A fresh in-memory image of `fmt` with create options `opts`.
fn created(fmt: Format, opts: &str, size: u64) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let options = OptionList::parse(opts).expect("options");
    fmt.driver()
        .expect("driver")
        .create(s.clone(), &mut CreateRequest::new(size, options))
        .expect("create");
    diskimg::open_storage(s, Some(fmt), false).expect("open")
}

/// Compressible, text-like content (words from a small vocabulary).
fn text() -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"disk ",
        b"image ",
        b"cluster ",
        b"qemu ",
        b"sector ",
        b"table\n",
        b"0x1f ",
        b"grain ",
    ];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut v = Vec::new();
    while v.len() < SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(
            words
                .get(usize::try_from(x % 8).unwrap_or(0))
                .unwrap_or(&words[0]),
        );
    }
    v.truncate(SIZE);
    v
}

fn dense() -> Vec<u8> {
    (0..SIZE)
        .map(|i| u8::try_from(i % 251).unwrap_or(0) | 1)
        .collect()
}

fn sparse() -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    for chunk in v.chunks_mut(1 << 20).step_by(8) {
        chunk.iter_mut().take(4096).for_each(|b| *b = 0xab);
    }
    v
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("convert");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    for (name, content) in [("dense", dense()), ("zeros-in-data", sparse())] {
        let src = device(content);
        for workers in [1usize, 4] {
            g.bench_function(format!("{name}/workers={workers}"), |b| {
                b.iter(|| {
                    let dst = device(vec![0; SIZE]);
                    let opts = ConvertOptions {
                        target_is_zero: true,
                        workers,
                        ..ConvertOptions::default()
                    };
                    convert(src.as_ref(), dst.as_ref(), &opts, &mut |_, _| {}).expect("convert")
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("convert-compressed");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    let src = device(text());
    for (name, fmt, opts) in [
        ("qcow2-zlib", Format::Qcow2, ""),
        ("qcow2-zstd", Format::Qcow2, "compression_type=zstd"),
        ("vmdk-stream", Format::Vmdk, "subformat=streamOptimized"),
    ] {
        for (workers, out_of_order) in [(1usize, false), (4, false), (4, true)] {
            let id = format!("{name}/m{workers}{}", if out_of_order { "-W" } else { "" });
            g.bench_function(id, |b| {
                b.iter(|| {
                    let dst = created(fmt, opts, SIZE as u64);
                    let opts = ConvertOptions {
                        target_is_zero: true,
                        compress: true,
                        workers,
                        out_of_order,
                        ..ConvertOptions::default()
                    };
                    convert(src.as_ref(), dst.as_ref(), &opts, &mut |_, _| {}).expect("convert")
                })
            });
        }
    }
    g.finish();
}

fn zero_detect(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero-detect");
    let zeros = vec![0u8; 2 << 20];
    g.throughput(Throughput::Bytes(zeros.len() as u64));
    g.bench_function("is_zero/2MiB-zero", |b| b.iter(|| is_zero(&zeros)));
    g.bench_function("zero_runs-4k/2MiB-zero", |b| {
        b.iter(|| zero_runs(&zeros, 0, 4096).len())
    });
    g.finish();
}

criterion_group!(benches, bench, zero_detect);
criterion_main!(benches);
