//! The late-read property of [`BlockDevice::host_epoch`] (issue 21): a reader takes the
//! epoch, walks a range ([`BlockDevice::walk_runs`]), and reads the host runs only after
//! other requests ran; while the epoch stayed, those host bytes must hold the guest
//! data the walk mapped or what those requests wrote into that same guest range.

use diskimg_blockio::{BlockDevice, Mapping, Storage};

/// A host run a walk reported: guest offset, length, host offset.
pub type HostRunAt = (u64, u64, u64);

/// An operation run between a walk and the late read: returns the guest ranges
/// (offset, length) it changed.
pub type LateOp<'a> = dyn FnMut(&dyn BlockDevice) -> Vec<(u64, u64)> + 'a;

/// Walks `off..off+len` of `dev` and returns its host runs, asserting that each lies
/// in `file` (single-file images).
pub fn host_runs(dev: &dyn BlockDevice, file: &dyn Storage, off: u64, len: u64) -> Vec<HostRunAt> {
    let mut runs = Vec::new();
    let want = std::ptr::from_ref(file).cast::<()>();
    let walked = dev
        .walk_runs(off, len, &mut |_, pos, n, m| {
            if let Mapping::Host(h) = m {
                assert!(
                    std::ptr::from_ref(h.storage).cast::<()>() == want,
                    "a host run outside the image file"
                );
                runs.push((pos, n, h.offset));
            }
            Ok(())
        })
        .expect("walk");
    assert!(walked, "the device has no walk");
    runs
}

/// Bytes `off..off+len` of `file`, zeroes past its end.
pub fn host_bytes(file: &dyn Storage, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(len).expect("length")];
    let end = file.len().expect("file length");
    let n = usize::try_from(end.saturating_sub(off).min(len)).expect("length");
    if n > 0 {
        file.read_exact_at(&mut buf[..n], off).expect("host read");
    }
    buf
}

/// Takes `dev`'s host epoch, walks `off..off+len`, runs `op` (which returns the guest
/// ranges it changed), and if the epoch stayed checks that every walked host byte holds
/// the guest byte from before `op`, or from after it inside a changed range. Returns
/// whether the epoch stayed (panics when the device has none).
pub fn late_read(
    dev: &dyn BlockDevice,
    file: &dyn Storage,
    off: u64,
    len: u64,
    op: &mut LateOp<'_>,
) -> bool {
    let e = dev.host_epoch().expect("the device answers its host epoch");
    let mut before = vec![0u8; usize::try_from(len).expect("length")];
    dev.read_at(&mut before, off).expect("read before");
    let runs = host_runs(dev, file, off, len);
    let changed = op(dev);
    if dev.host_epoch() != Some(e) {
        return false;
    }
    let mut after = vec![0u8; before.len()];
    dev.read_at(&mut after, off).expect("read after");
    for (g, n, h) in runs {
        for (i, b) in host_bytes(file, h, n).into_iter().enumerate() {
            let at = g + i as u64;
            let k = usize::try_from(at - off).expect("index");
            let hit = changed.iter().any(|&(o, l)| o <= at && at < o + l);
            assert!(
                b == before[k] || (hit && b == after[k]),
                "epoch {e} stayed, but host {:#x} (walked for guest {at:#x}) holds {b:#x}, \
                 not {:#x} (before) or {:#x} (after)",
                h + i as u64,
                before[k],
                after[k],
            );
        }
    }
    true
}

/// For a format whose host epoch is a constant (`Some(0)` without a backing file): an
/// image qemu-img creates (`fmt`, `create_opts`, four blocks of `block` bytes) answers
/// `Some(0)` read-only and writable, and while writes in place and into fresh blocks,
/// zero writes and discards run between a walk of the whole disk and the late read of
/// its runs, the walked host bytes keep their guest data (the claim the constant
/// makes); qemu reads the image as we do afterwards.
pub fn check_constant_epoch(
    driver: &dyn diskimg_blockio::Driver,
    fmt: &str,
    create_opts: &str,
    block: u64,
) {
    use std::sync::Arc;

    use diskimg_blockio::{FileStorage, OpenOptions, ZeroFlags};

    let dir = crate::tempdir();
    let path = dir.path().join(format!("epoch.{fmt}"));
    let p = path.to_string_lossy().to_string();
    let size = 4 * block;
    let mut args = vec!["create", "-q", "-f", fmt];
    if !create_opts.is_empty() {
        args.extend(["-o", create_opts]);
    }
    let size_arg = size.to_string();
    args.extend([p.as_str(), size_arg.as_str()]);
    crate::qemu_img_ok(&args);
    let open = |ro: bool| {
        let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&path, ro).expect("open file"));
        let dev = driver
            .open(s.clone(), &OpenOptions::new().read_only(ro))
            .expect("open image");
        (s, dev)
    };
    {
        let (_, ro) = open(true);
        assert_eq!(ro.host_epoch(), Some(0), "read-only open");
    }
    let (s, dev) = open(false);
    assert_eq!(dev.host_epoch(), Some(0), "writable open");
    dev.write_at(&crate::pattern(1, 2 * block as usize), 0)
        .expect("write");
    let flags = ZeroFlags { may_unmap: true };
    type Op<'a> = Box<LateOp<'a>>;
    let ops: Vec<(&str, Op)> = vec![
        (
            "write in place",
            Box::new(|d| {
                d.write_at(&crate::pattern(2, 5000), 700).expect("write");
                vec![(700, 5000)]
            }),
        ),
        (
            "allocating write",
            Box::new(|d| {
                d.write_at(&crate::pattern(3, 8192), 2 * block + 4096)
                    .expect("write");
                vec![(2 * block + 4096, 8192)]
            }),
        ),
        (
            "zeroes, whole block",
            Box::new(|d| {
                d.write_zeroes(0, block, flags).expect("zeroes");
                vec![(0, block)]
            }),
        ),
        (
            "zeroes, partial",
            Box::new(|d| {
                d.write_zeroes(block + 512, 4096, flags).expect("zeroes");
                vec![(block + 512, 4096)]
            }),
        ),
        (
            "discard all, then new data",
            Box::new(|d| {
                d.discard(0, size).expect("discard");
                d.write_at(&crate::pattern(4, block as usize), 3 * block)
                    .expect("write");
                d.write_at(&crate::pattern(5, 4096), block).expect("write");
                vec![(0, size)]
            }),
        ),
    ];
    for (what, mut op) in ops {
        assert!(
            late_read(dev.as_ref(), s.as_ref(), 0, size, &mut *op),
            "{what} moved the epoch"
        );
    }
    assert_eq!(dev.host_epoch(), Some(0));
    let ours = crate::read_all(dev.as_ref());
    dev.close().expect("close");
    drop(dev);
    assert!(
        crate::qemu_read_raw(&path, fmt) == ours,
        "qemu reads the image otherwise"
    );
}

/// A device that forwards everything but its host epoch (it cannot tell).
#[derive(Debug)]
pub struct NoEpoch(pub std::sync::Arc<dyn BlockDevice>);

impl BlockDevice for NoEpoch {
    diskimg_blockio::forward_device!(0: all except host_epoch);
}

/// For a device whose walk reports its backing device's runs: over `parent` it answers
/// its own count plus the parent's, over a parent that cannot tell `None`, and each
/// replacement of the backing device moves the answer up (never back to a value a
/// walk through the old one saw).
pub fn check_backing_epoch(child: &dyn BlockDevice, parent: std::sync::Arc<dyn BlockDevice>) {
    child
        .set_backing(Some(parent.clone()))
        .expect("set backing");
    let a = child.host_epoch().expect("over a parent that answers");
    child
        .set_backing(Some(std::sync::Arc::new(NoEpoch(parent.clone()))))
        .expect("set backing");
    assert_eq!(child.host_epoch(), None, "over a parent that cannot tell");
    child.set_backing(Some(parent)).expect("set backing");
    let b = child.host_epoch().expect("over a parent that answers");
    assert!(
        b > a,
        "replacing the backing device must move the epoch: {a} then {b}"
    );
}
