//! proptest: random contents and options; the target always reads back the source,
//! and the source is never modified.

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, MemStorage, Storage};
use diskimg_convert::{ConvertOptions, convert};
use diskimg_raw::RawDevice;
use proptest::prelude::*;

fn raw(bytes: Vec<u8>) -> (Arc<MemStorage>, Arc<dyn BlockDevice>) {
    let s = Arc::new(MemStorage::from_vec(bytes));
    let st: Arc<dyn Storage> = s.clone();
    (s, Arc::new(RawDevice::new(st, false).unwrap()))
}

fn content() -> impl Strategy<Value = Vec<u8>> {
    // Sizes up to 96 KiB with runs of zeroes and of data, unaligned lengths included.
    (
        1usize..96 * 1024,
        prop::collection::vec((0usize..96 * 1024, 1usize..20_000, any::<u8>()), 0..8),
    )
        .prop_map(|(size, runs)| {
            let mut v = vec![0u8; size];
            for (off, len, b) in runs {
                let off = off % size;
                let end = (off + len).min(size);
                v[off..end].fill(b);
            }
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn target_reads_back_source(
        src_bytes in content(),
        junk in any::<bool>(),
        sparse in prop::sample::select(vec![0u64, 512, 4096, 65536]),
        chunk in prop::sample::select(vec![512u64, 4096, 12288, 2 << 20]),
        workers in 1usize..4,
        ooo in any::<bool>(),
    ) {
        let size = src_bytes.len();
        let (src_store, src) = raw(src_bytes.clone());
        // A target that is not zero unless we say so.
        let (_dst_store, dst) = raw(vec![if junk { 0x5a } else { 0 }; size]);
        let opts = ConvertOptions {
            sparse_size: sparse,
            target_is_zero: !junk,
            chunk_size: chunk,
            workers,
            out_of_order: ooo,
            ..ConvertOptions::default()
        };
        let mut last = (0, 0);
        let stats = convert(src.as_ref(), dst.as_ref(), &opts, &mut |d, t| last = (d, t)).unwrap();
        prop_assert_eq!(last, (size as u64, size as u64));
        let mut out = vec![0u8; size];
        dst.read_at(&mut out, 0).unwrap();
        prop_assert!(out == src_bytes, "content differs");
        prop_assert!(src_store.to_vec() == src_bytes, "source modified");
        prop_assert_eq!(
            stats.data_bytes + stats.zeroed_bytes + stats.skipped_bytes,
            size as u64
        );
        if sparse == 0 {
            prop_assert_eq!(stats.data_bytes, size as u64);
        }
    }
}
