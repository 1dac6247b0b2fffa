//! Copy offloading (`ConvertOptions::copy_offload`, qemu-img's `-C`): which ranges go
//! through `write_from`, and that the result is the same as a plain conversion.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, FileStorage, MemStorage, OpenOptions, OptionList, Storage,
    ZeroFlags, forward_device,
};
use diskimg_convert::{ConcatDevice, ConvertOptions, convert};
use diskimg_raw::RawDevice;

fn read(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

fn qcow2(size: u64, options: &str) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(size, OptionList::parse(options).unwrap());
    diskimg_qcow2::DRIVER.create(s.clone(), &mut req).unwrap();
    diskimg_qcow2::DRIVER.open(s, &OpenOptions::new()).unwrap()
}

fn offload() -> ConvertOptions {
    ConvertOptions {
        copy_offload: true,
        target_is_zero: true,
        ..ConvertOptions::default()
    }
}

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8) | 1).collect()
}

#[test]
fn raw_files_copy_data_extents_and_skip_holes() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str, len: u64| -> Arc<dyn BlockDevice> {
        let s = FileStorage::create(dir.path().join(name)).unwrap();
        s.set_len(len).unwrap();
        Arc::new(RawDevice::new(Arc::new(s), false).unwrap())
    };
    let size = (16 << 20) + 512;
    let src = open("src.raw", size);
    src.write_at(&fill(1, 3 << 20), 1 << 20).unwrap();
    // Zeroes written as data: offloaded as data (no zero detection, as qemu-img -C).
    src.write_at(&[0; 65536], 8 << 20).unwrap();
    src.write_at(&fill(2, 512), size - 512).unwrap();
    for (workers, ooo) in [(1, false), (4, false), (4, true)] {
        let dst = open(&format!("dst{workers}{ooo}.raw"), size);
        let opts = ConvertOptions {
            workers,
            out_of_order: ooo,
            ..offload()
        };
        let st = convert(src.as_ref(), dst.as_ref(), &opts, &mut |_, _| {}).unwrap();
        assert_eq!(st.data_bytes, 0, "{st:?}");
        assert_eq!(st.offloaded_bytes, (3 << 20) + 65536 + 512, "{st:?}");
        assert_eq!(read(dst.as_ref()), read(src.as_ref()));
    }
    // Without the option: read, scanned, zero block dropped.
    let dst = open("plain.raw", size);
    let opts = ConvertOptions {
        target_is_zero: true,
        ..ConvertOptions::default()
    };
    let st = convert(src.as_ref(), dst.as_ref(), &opts, &mut |_, _| {}).unwrap();
    assert_eq!((st.offloaded_bytes, st.data_bytes), (0, (3 << 20) + 512));
}

#[test]
fn qcow2_chain_offloads_only_the_top_layer() {
    let size = (5 << 20) + 512;
    let base = qcow2(size, "cluster_size=64k");
    base.write_at(&fill(3, 2 << 20), 0).unwrap();
    let top = qcow2(size, "cluster_size=512");
    top.set_backing(Some(base.clone())).unwrap();
    top.write_at(&fill(4, 100_000), 1 << 20).unwrap();
    top.write_at(&fill(5, 700), size - 700).unwrap();
    top.write_zeroes(4096, 8192, ZeroFlags::default()).unwrap();
    for dst_opts in ["cluster_size=512", "cluster_size=64k", "cluster_size=2M"] {
        let dst = qcow2(size, dst_opts);
        let st = convert(top.as_ref(), dst.as_ref(), &offload(), &mut |_, _| {}).unwrap();
        // Top-layer data is offloaded (whole 512-byte sectors around it).
        assert_eq!(st.offloaded_bytes, 100_352 + 1024, "{dst_opts} {st:?}");
        // Backing data is read as usual (minus what the top layer covers).
        assert_eq!(
            st.data_bytes,
            (2 << 20) - 100_352 - 8192,
            "{dst_opts} {st:?}"
        );
        assert_eq!(read(dst.as_ref()), read(top.as_ref()), "{dst_opts}");
        let r = dst.check(Default::default()).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{dst_opts}");
    }
    let raw: Arc<dyn BlockDevice> = Arc::new(
        RawDevice::new(
            Arc::new(MemStorage::from_vec(vec![0; size as usize])),
            false,
        )
        .unwrap(),
    );
    let st = convert(top.as_ref(), raw.as_ref(), &offload(), &mut |_, _| {}).unwrap();
    assert_eq!(st.offloaded_bytes, 100_352 + 1024);
    assert_eq!(read(raw.as_ref()), read(top.as_ref()));
}

#[test]
fn sources_without_data_storage_and_conflicting_options() {
    let size = 1u64 << 20;
    let a = qcow2(size, "");
    a.write_at(&fill(6, 4096), 0).unwrap();
    let cat: Arc<dyn BlockDevice> =
        Arc::new(ConcatDevice::new(vec![a.clone(), a.clone()]).unwrap());
    assert!(cat.data_storage().is_none());
    let dst = qcow2(2 * size, "");
    let st = convert(cat.as_ref(), dst.as_ref(), &offload(), &mut |_, _| {}).unwrap();
    assert_eq!((st.offloaded_bytes, st.data_bytes), (0, 8192));
    assert_eq!(read(dst.as_ref()), read(cat.as_ref()));
    // With -B, data must be compared with the backing image: read as usual.
    let b = qcow2(size, "");
    let dst = qcow2(size, "");
    dst.set_backing(Some(b.clone())).unwrap();
    let opts = ConvertOptions {
        backing: Some(b),
        target_is_zero: false,
        ..offload()
    };
    let st = convert(a.as_ref(), dst.as_ref(), &opts, &mut |_, _| {}).unwrap();
    assert_eq!((st.offloaded_bytes, st.data_bytes), (0, 4096));
    // Compression and offloading exclude each other.
    let opts = ConvertOptions {
        compress: true,
        ..offload()
    };
    assert!(convert(a.as_ref(), qcow2(size, "").as_ref(), &opts, &mut |_, _| {}).is_err());
}

/// A raw target that hides its data storage, as a format that cannot offload.
#[derive(Debug)]
struct Opaque(Arc<dyn BlockDevice>);

impl BlockDevice for Opaque {
    // Not data_storage (the point of the wrapper), nor as_any (a downcast must not find
    // the raw device inside).
    forward_device!(0: info, read_at, write_at, flush, map);
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn targets_that_cannot_offload_convert_as_without_the_option() {
    let mut bytes = fill(7, 1 << 20);
    bytes[4096..65536].fill(0);
    let src: Arc<dyn BlockDevice> =
        Arc::new(RawDevice::new(Arc::new(MemStorage::from_vec(bytes.clone())), false).unwrap());
    let inner: Arc<dyn BlockDevice> =
        Arc::new(RawDevice::new(Arc::new(MemStorage::from_vec(vec![0; 1 << 20])), false).unwrap());
    let dst = Opaque(inner);
    let st = convert(src.as_ref(), &dst, &offload(), &mut |_, _| {}).unwrap();
    // Not offloaded, and the zero blocks inside the data are found (qemu-img's fallback).
    assert_eq!(st.offloaded_bytes, 0, "{st:?}");
    assert_eq!(st.data_bytes, (1 << 20) - 61440, "{st:?}");
    assert_eq!(read(&dst), bytes);
}
