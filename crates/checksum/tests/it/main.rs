#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! The parallel walk against the incremental hasher over the same bytes, on qcow2
//! devices with data, zero clusters and unallocated ranges.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage, ZeroFlags,
};
use diskimg_checksum::{Algorithm, Hasher, Options, checksum};
use proptest::prelude::*;

fn qcow2(size: u64) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut o = OptionList::new();
    o.set("cluster_size", "4096");
    diskimg_qcow2::DRIVER
        .create(s.clone(), &mut CreateRequest::new(size, o))
        .unwrap();
    diskimg_qcow2::DRIVER.open(s, &OpenOptions::new()).unwrap()
}

fn flat(alg: Algorithm, bytes: &[u8]) -> String {
    let mut h = Hasher::new(alg);
    // Uneven pieces: the incremental hasher must not care how bytes arrive.
    for c in bytes.chunks(70_001) {
        h.update(c);
    }
    h.finalize().hex()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn walk_equals_flat_bytes(
        size_blocks in 1u64..40,
        tail in 0u64..2,
        ops in proptest::collection::vec((0u64..40, 1u64..70, any::<u8>(), any::<bool>()), 0..12),
        workers in 1usize..5,
        chunk_blocks in 1u64..4,
    ) {
        let size = size_blocks * 65536 + tail * 512;
        let dev = qcow2(size);
        let mut model = vec![0u8; size as usize];
        for (blk, kib, byte, zero) in ops {
            let off = (blk * 16384).min(size);
            let len = (kib * 1024).min(size - off);
            if len == 0 { continue; }
            if zero {
                dev.write_zeroes(off, len, ZeroFlags::default()).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            } else {
                let buf = vec![byte; len as usize];
                dev.write_at(&buf, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
        }
        for alg in [Algorithm::Blkhash, Algorithm::Sha256, Algorithm::Blake3] {
            let opts = Options { algorithm: alg, workers, chunk_size: chunk_blocks * 65536 };
            let mut last = 0;
            let got = checksum(dev.as_ref(), &opts, &mut |d, t| {
                assert!(d >= last && d <= t);
                last = d;
            }).unwrap();
            prop_assert_eq!(got.hex(), flat(alg, &model));
            prop_assert_eq!(last, size);
        }
    }
}

/// A device whose reads fail at and after `bad`.
#[derive(Debug)]
struct Failing {
    size: u64,
    bad: u64,
}

impl BlockDevice for Failing {
    fn info(&self) -> diskimg_blockio::DeviceInfo {
        diskimg_blockio::DeviceInfo::new("raw", self.size)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> diskimg_blockio::Result<()> {
        if off + buf.len() as u64 > self.bad {
            return Err(diskimg_blockio::Error::invalid("injected read error"));
        }
        buf.fill(1);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> diskimg_blockio::Result<()> {
        Err(diskimg_blockio::Error::ReadOnly)
    }
    fn flush(&self) -> diskimg_blockio::Result<()> {
        Ok(())
    }
    fn map(&self, off: u64, len: u64) -> diskimg_blockio::Result<diskimg_blockio::Extent> {
        Ok(diskimg_blockio::Extent {
            offset: off,
            len,
            kind: diskimg_blockio::ExtentKind::Data { offset: None },
        })
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn read_errors_are_reported() {
    let dev = Failing {
        size: 64 << 20,
        bad: 40 << 20,
    };
    for workers in [1, 4] {
        for alg in [Algorithm::Blkhash, Algorithm::Sha256] {
            let opts = Options {
                workers,
                algorithm: alg,
                chunk_size: 1 << 20,
            };
            let e = checksum(&dev, &opts, &mut |_, _| {}).unwrap_err();
            assert!(e.to_string().contains("injected"), "{e}");
        }
    }
}
