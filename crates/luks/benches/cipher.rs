//! Sector cipher throughput: diskimg's batched XTS/CBC against the `xts-mode` crate
//! (`cargo bench -p diskimg-luks --bench cipher`). Figures in docs/benchmarks.md.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::indexing_slicing
)]

use aes::Aes256;
use aes::cipher::KeyInit;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diskimg_luks::{HashAlg, IvGen, Mode, SectorCipher};

const LEN: usize = 1 << 20;

fn tweak(s: u128) -> [u8; 16] {
    (s as u64 as u128).to_le_bytes()
}

fn ciphers(c: &mut Criterion) {
    let key: Vec<u8> = (0..64u8).collect();
    let mut buf = vec![0x5au8; LEN];
    let mut g = c.benchmark_group("sector_cipher");
    g.throughput(Throughput::Bytes(LEN as u64));

    let xts = SectorCipher::new(Mode::Xts, IvGen::Plain64, &key).unwrap();
    g.bench_function("xts_aes256_encrypt/diskimg", |b| {
        b.iter(|| xts.encrypt(&mut buf, 1000).unwrap())
    });
    g.bench_function("xts_aes256_decrypt/diskimg", |b| {
        b.iter(|| xts.decrypt(&mut buf, 1000).unwrap())
    });
    let (k1, k2) = key.split_at(32);
    let crate_xts = xts_mode::Xts128::new(
        Aes256::new_from_slice(k1).unwrap(),
        Aes256::new_from_slice(k2).unwrap(),
    );
    g.bench_function("xts_aes256_encrypt/xts-mode", |b| {
        b.iter(|| crate_xts.encrypt_area(&mut buf, 512, 1000, tweak))
    });
    g.bench_function("xts_aes256_decrypt/xts-mode", |b| {
        b.iter(|| crate_xts.decrypt_area(&mut buf, 512, 1000, tweak))
    });

    let cbc = SectorCipher::new(Mode::Cbc, IvGen::Essiv(HashAlg::Sha256), &key[..32]).unwrap();
    g.bench_function("cbc_essiv_aes256_encrypt/diskimg", |b| {
        b.iter(|| cbc.encrypt(&mut buf, 1000).unwrap())
    });
    g.bench_function("cbc_essiv_aes256_decrypt/diskimg", |b| {
        b.iter(|| cbc.decrypt(&mut buf, 1000).unwrap())
    });
    g.finish();
}

criterion_group!(benches, ciphers);
criterion_main!(benches);
