//! Sequential and random qcow2 reads on an in-memory image (`cargo bench -p diskimg-qcow2`).
#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage,
};

const SIZE: u64 = 32 << 20;

fn image() -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::new());
    diskimg_qcow2::DRIVER.create(s.clone(), &mut req).unwrap();
    let dev = diskimg_qcow2::DRIVER.open(s, &OpenOptions::new()).unwrap();
    let buf = vec![0x5au8; 1 << 20];
    let mut off = 0;
    while off < SIZE {
        dev.write_at(&buf, off).unwrap();
        off += 1 << 20;
    }
    dev
}

fn reads(c: &mut Criterion) {
    let dev = image();
    let mut g = c.benchmark_group("qcow2_read");
    g.throughput(Throughput::Bytes(SIZE));
    g.bench_function("sequential_1m", |b| {
        let mut buf = vec![0u8; 1 << 20];
        b.iter(|| {
            let mut off = 0;
            while off < SIZE {
                dev.read_at(&mut buf, off).unwrap();
                off += 1 << 20;
            }
        })
    });
    g.throughput(Throughput::Bytes(4096 * 4096));
    g.bench_function("random_4k", |b| {
        let mut buf = vec![0u8; 4096];
        b.iter(|| {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..4096 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                dev.read_at(&mut buf, (x % (SIZE / 4096)) * 4096).unwrap();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, reads);
criterion_main!(benches);
