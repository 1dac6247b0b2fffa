//! Differencing images: parent locator, reads through the parent, partially present
//! blocks with sector bitmaps (qemu cannot open these, so the oracle is the parent's
//! content as qemu reads it plus our writes).

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, RepairMode, ZeroFlags};
use diskimg_testutil::{pattern, qemu_create, qemu_img, qemu_io, qemu_read_raw, read_all, tempdir};

use crate::common::{create, open};

fn child_of(
    dir: &std::path::Path,
    base: &Arc<dyn BlockDevice>,
) -> (std::path::PathBuf, Arc<dyn BlockDevice>) {
    let child = dir.join("child.vhdx");
    create(
        &child,
        base.virtual_size(),
        "backing_file=base.vhdx,backing_fmt=vhdx,block_size=1M",
    );
    let dev = open(&child, false);
    let b = dev.info().backing.unwrap();
    assert_eq!(b.filename, "base.vhdx");
    assert_eq!(b.format.as_deref(), Some("vhdx"));
    dev.set_backing(Some(base.clone())).unwrap();
    (child, dev)
}

#[test]
fn differencing_reads_parent_and_own_sectors() {
    let dir = tempdir();
    let base = dir.path().join("base.vhdx");
    qemu_create(&base, "vhdx", "block_size=1M", Some("8M"));
    qemu_io(&base, "vhdx", &["write -P 0x11 0 8M"]);
    let mut expect = qemu_read_raw(&base, "vhdx");
    let base_dev = open(&base, true);
    let (child, dev) = child_of(dir.path(), &base_dev);
    // qemu refuses differencing VHDX.
    assert!(
        !qemu_img(&["info", child.to_str().unwrap()])
            .status
            .success()
    );
    assert!(read_all(dev.as_ref()) == expect);
    let writes: &[(u64, usize)] = &[
        (100, 10),
        (4096, 512),
        ((1 << 20) - 3, 9),
        (3 << 20, 1 << 20),
        (7 << 20, 70_000),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        dev.write_at(&data, off).unwrap();
        expect[off as usize..off as usize + len].copy_from_slice(&data);
    }
    dev.write_zeroes(5 << 20, 1 << 20, ZeroFlags::default())
        .unwrap();
    expect[5 << 20..6 << 20].fill(0);
    dev.write_zeroes(6 << 20, 1000, ZeroFlags::default())
        .unwrap();
    expect[6 << 20..(6 << 20) + 1000].fill(0);
    let got = read_all(dev.as_ref());
    let first = got.iter().zip(&expect).position(|(a, b)| a != b);
    assert_eq!(first, None, "first difference");
    // Partially present blocks map as data runs and unallocated runs.
    let e = dev.map(0, 8 << 20).unwrap();
    assert_eq!((e.offset, e.len), (0, 512));
    assert!(matches!(e.kind, diskimg_blockio::ExtentKind::Data { .. }));
    let e = dev.map(512, (8 << 20) - 512).unwrap();
    assert!(!e.kind.is_present());
    dev.flush().unwrap();
    assert_eq!(dev.check(RepairMode::None).unwrap().corruptions, 0);
    drop(dev);
    let dev = open(&child, true);
    dev.set_backing(Some(base_dev.clone())).unwrap();
    assert!(read_all(dev.as_ref()) == expect);
    // Without its parent the unallocated parts read as zeroes.
    let lone = open(&child, true);
    let mut b = [9u8; 16];
    lone.read_at(&mut b, 2 << 20).unwrap();
    assert_eq!(b, [0; 16]);
}

#[test]
fn parent_locator_paths() {
    let dir = tempdir();
    let child = dir.path().join("c.vhdx");
    create(&child, 4 << 20, "backing_file=sub/dir/p.vhdx");
    let b = open(&child, true).info().backing.unwrap();
    assert_eq!(b.filename, "sub/dir/p.vhdx");
    create(&child, 4 << 20, "backing_file=/abs/p.vhdx");
    let b = open(&child, true).info().backing.unwrap();
    assert_eq!(b.filename, "/abs/p.vhdx");
    assert!(open(&child, true).set_backing(None).is_ok());
    let plain = dir.path().join("p.vhdx");
    create(&plain, 4 << 20, "");
    assert!(open(&plain, true).info().backing.is_none());
    assert!(
        open(&plain, true)
            .set_backing(Some(open(&child, true)))
            .is_err()
    );
}
