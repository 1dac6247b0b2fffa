//! io_uring storage tests. They need io_uring: a kernel without it (or with
//! `kernel.io_uring_disabled` set) fails them loudly rather than skipping.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use super::*;
use crate::aio::IoBuf;

pub(crate) fn ring(depth: usize) -> Arc<Uring> {
    match Uring::new(depth) {
        Ok(r) => Arc::new(r),
        Err(e) => panic!(
            "io_uring is unavailable ({e}; /proc/sys/kernel/io_uring_disabled = {:?}): \
             the io_uring tests need it",
            std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        ),
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(u64::from(seed)) as u8
        })
        .collect()
}

#[test]
fn round_trip_with_the_sync_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let s = UringStorage::new(FileStorage::create(&path).unwrap(), ring(4));
    let data = pattern(1, (1 << 20) + 3);
    s.write_all_at(&data, 1000).unwrap();
    let plain = FileStorage::open(&path, true).unwrap();
    let mut back = vec![0u8; data.len()];
    plain.read_exact_at(&mut back, 1000).unwrap();
    assert_eq!(back, data);
    let mut again = vec![0u8; data.len()];
    s.read_exact_at(&mut again, 1000).unwrap();
    assert_eq!(again, data);
    // Vectored, with an empty piece, then read back both ways.
    let (a, b) = (pattern(2, 3000), pattern(3, 5000));
    let bufs = [IoSlice::new(&a), IoSlice::new(&[]), IoSlice::new(&b)];
    s.write_vectored_all_at(&bufs, 7).unwrap();
    let (mut x, mut y) = (vec![0u8; 10], vec![0u8; 7990]);
    s.read_vectored_exact_at(&mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)], 7)
        .unwrap();
    let mut whole = vec![0u8; 8000];
    plain.read_exact_at(&mut whole, 7).unwrap();
    assert_eq!([&a[..], &b[..]].concat(), whole);
    assert_eq!([x, y].concat(), whole);
    // Past the end: an error, as FileStorage's.
    let len = s.len().unwrap();
    let mut tail = vec![0u8; 20];
    assert!(s.read_exact_at(&mut tail, len - 10).is_err());
    assert!(
        s.read_vectored_exact_at(&mut [IoSliceMut::new(&mut tail)], len - 10)
            .is_err()
    );
    let ro = UringStorage::new(plain, ring(1));
    assert!(matches!(ro.write_all_at(&[1], 0), Err(Error::ReadOnly)));
    assert!(ro.uring().is_some());
}

#[test]
fn many_threads_share_one_small_ring() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = pattern(9, 4 << 20);
    std::fs::write(&path, &data).unwrap();
    // More threads than the queue depth: the rest wait in the backlog.
    let s = UringStorage::open(&path, true, CacheMode::Writeback, ring(3)).unwrap();
    std::thread::scope(|sc| {
        for t in 0..8u64 {
            let (s, data) = (&s, &data);
            sc.spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut x = t + 1;
                for _ in 0..300 {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let off = (x >> 20) % (data.len() as u64 - 4096);
                    s.read_exact_at(&mut buf, off).unwrap();
                    let o = off as usize;
                    assert_eq!(&buf[..], &data[o..o + 4096]);
                }
            });
        }
    });
}

#[test]
fn o_direct_aligned_requests_use_the_ring_and_others_fall_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    FileStorage::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let s = UringStorage::open(&path, false, CacheMode::None, ring(8)).unwrap();
    let d = s.file_storage().direct_io().expect("O_DIRECT");
    let mut model = vec![0u8; 1 << 20];
    // Aligned, from an aligned buffer: straight to the ring.
    let mut a = IoBuf::new(64 << 10);
    a.copy_from_slice(&pattern(4, 64 << 10));
    assert!(d.fits(a.as_ptr(), 8192, a.len()));
    s.write_all_at(&a, 8192).unwrap();
    model[8192..8192 + a.len()].copy_from_slice(&a);
    // Unaligned offset, length and buffer: the bounce path.
    let b = pattern(5, 1000);
    assert!(!d.fits(b[1..].as_ptr(), 777, 999));
    s.write_all_at(&b[1..], 777).unwrap();
    model[777..1776].copy_from_slice(&b[1..]);
    // A write past the end keeps the length a buffered write gives.
    s.write_all_at(&b[..10], (1 << 20) - 5).unwrap();
    model.truncate((1 << 20) - 5);
    model.extend_from_slice(&b[..10]);
    assert_eq!(s.len().unwrap(), (1 << 20) + 5);
    let mut back = IoBuf::new(model.len());
    s.read_exact_at(&mut back[..(1 << 20)], 0).unwrap();
    s.read_exact_at(&mut back[(1 << 20)..], 1 << 20).unwrap();
    assert_eq!(&back[..], &model[..]);
    let mut odd = vec![0u8; 3001];
    s.read_exact_at(&mut odd, 501).unwrap();
    assert_eq!(&odd[..], &model[501..3502]);
    s.flush().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model);
}
