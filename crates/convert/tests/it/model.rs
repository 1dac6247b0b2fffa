//! proptest: random contents and options; the target always reads back the source,
//! and the source is never modified.

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, MemStorage, Storage, forward_device};
use diskimg_convert::{ConvertOptions, convert};
use diskimg_raw::RawDevice;
use proptest::prelude::*;

fn raw(bytes: Vec<u8>) -> (Arc<MemStorage>, Arc<dyn BlockDevice>) {
    let s = Arc::new(MemStorage::from_vec(bytes));
    let st: Arc<dyn Storage> = s.clone();
    (s, Arc::new(RawDevice::new(st, false).unwrap()))
}

fn content() -> impl Strategy<Value = Vec<u8>> {
    // Sizes up to 96 KiB (whole sectors: raw rounds its size up to 512 as qemu does)
    // with runs of zeroes and of data at unaligned offsets and lengths.
    (
        (1usize..192).prop_map(|n| n * 512),
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
        offload in any::<bool>(),
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
            copy_offload: offload,
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
            stats.data_bytes + stats.offloaded_bytes + stats.zeroed_bytes + stats.skipped_bytes,
            size as u64
        );
        if sparse == 0 {
            prop_assert_eq!(stats.data_bytes + stats.offloaded_bytes, size as u64);
        }
        // Memory storage has no holes: with offloading everything is one data extent.
        prop_assert_eq!(stats.offloaded_bytes, if offload { size as u64 } else { 0 });
    }
}

/// A target that records which ranges were written (any way), over a zeroed raw device.
#[derive(Debug)]
struct Overlay {
    inner: Arc<dyn BlockDevice>,
    written: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl BlockDevice for Overlay {
    forward_device!(inner: info, read_at, flush, map);
    fn write_at(&self, buf: &[u8], off: u64) -> diskimg_blockio::Result<()> {
        self.written.lock().unwrap().push((off, buf.len() as u64));
        self.inner.write_at(buf, off)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// With a backing image (`-B`), the overlay view (written ranges over the backing)
    /// equals the source, and ranges equal to the backing are not written.
    #[test]
    fn backing_overlay_reads_back_source(
        base in content(),
        edits in prop::collection::vec((0usize..96 * 1024, 1usize..9000, any::<u8>()), 0..6),
        workers in 1usize..3,
    ) {
        let size = base.len();
        let mut top = base.clone();
        for (off, len, b) in edits {
            let off = off % size;
            let end = (off + len).min(size);
            top[off..end].fill(b);
        }
        let (_, src) = raw(top.clone());
        let (_, backing) = raw(base.clone());
        let (_, inner) = raw(vec![0; size]);
        let dst = Overlay { inner, written: std::sync::Mutex::new(Vec::new()) };
        let opts = ConvertOptions { backing: Some(backing), workers, chunk_size: 8192, ..ConvertOptions::default() };
        convert(src.as_ref(), &dst, &opts, &mut |_, _| {}).unwrap();
        let mut view = base.clone();
        let mut out = vec![0u8; size];
        dst.read_at(&mut out, 0).unwrap();
        for &(off, len) in dst.written.lock().unwrap().iter() {
            let (o, e) = (off as usize, (off + len) as usize);
            view[o..e].copy_from_slice(&out[o..e]);
            // Nothing is written where the whole 4 KiB block already equals the backing.
            let (bs, be) = (o / 4096 * 4096, (e.div_ceil(4096) * 4096).min(size));
            prop_assert!(top[bs..be] != base[bs..be], "wrote an unchanged block at {off}");
        }
        prop_assert!(view == top, "overlay view differs from the source");
    }
}
