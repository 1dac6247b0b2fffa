//! Criterion benches of diskimg-convert on in-memory raw devices: a sparse image
//! (mostly holes) and a dense one, sequential and with 4 worker threads.
#![allow(missing_docs)]

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diskimg::blockio::{MemStorage, Storage};
use diskimg::{BlockDevice, Format};
use diskimg_convert::{ConvertOptions, convert};

const SIZE: usize = 32 << 20;

fn device(bytes: Vec<u8>) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
    diskimg::open_storage(s, Some(Format::Raw), false).expect("open raw")
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
