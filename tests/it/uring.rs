//! The io_uring storage and the async face through the facade (issue 17): for every
//! writable format, an image qemu-img created is opened on an io_uring in cache mode
//! `none` (`O_DIRECT`), written through the async face (and the sync vectored call),
//! read back through the async face, closed, then compared with the model by our sync
//! path and by `qemu-img compare`. The kernel must have io_uring: without it these tests
//! fail (they do not skip).

use std::io::IoSlice;
use std::sync::Arc;

use diskimg::blockio::{AsyncDevice, CacheMode, IoBuf};
use diskimg::{Format, ImageOptions, open};
use diskimg_testutil::{pattern, qemu_compare, qemu_img_ok, read_all, tempdir};

const SIZE: u64 = 4 << 20;

/// (offset, length) of the writes: aligned (straight to the ring under `O_DIRECT`) and
/// not (the bounce path), across cluster and block boundaries.
const WRITES: [(u64, usize); 6] = [
    (0, 4096),
    (65536 - 512, 8192),
    (1 << 20, 256 << 10),
    ((2 << 20) + 7, 3000),
    ((3 << 20) - 4096, 4096),
    (SIZE - 512, 512),
];

fn uring_opts(ro: bool) -> ImageOptions {
    ImageOptions::read_only(ro)
        .with_cache(CacheMode::None)
        .with_io_uring(8)
        .unwrap_or_else(|e| {
            panic!(
                "io_uring is unavailable ({e}; kernel.io_uring_disabled = {:?})",
                std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            )
        })
}

fn round_trip(fmt: Format, name: &str) {
    let dir = tempdir();
    let img = dir.path().join(format!("img.{name}"));
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        name,
        &img.to_string_lossy(),
        &SIZE.to_string(),
    ]);
    let image = open(&img, Some(fmt), &uring_opts(false)).unwrap();
    let dev = image.device.clone();
    let size = dev.virtual_size();
    let mut model = vec![0u8; usize::try_from(size).unwrap()];
    let aio = AsyncDevice::new(dev.clone()).unwrap();
    pollster::block_on(async {
        let futs: Vec<_> = WRITES
            .iter()
            .enumerate()
            .map(|(i, &(off, len))| {
                let data = pattern(i as u64 + 1, len);
                model[off as usize..off as usize + len].copy_from_slice(&data);
                let mut buf = IoBuf::new(len);
                buf.copy_from_slice(&data);
                aio.write_at(buf, off)
            })
            .collect();
        for f in futs {
            f.await.unwrap();
        }
        aio.flush().await.unwrap();
    });
    // The sync vectored call on the same ring.
    let (a, b) = (pattern(90, 1000), pattern(91, 3096));
    dev.write_vectored_at(&[IoSlice::new(&a), IoSlice::new(&b)], 12288)
        .unwrap();
    model[12288..13288].copy_from_slice(&a);
    model[13288..16384].copy_from_slice(&b);
    // Async reads, many in flight, aligned and not.
    let reads: Vec<_> = (0..32u64)
        .map(|i| {
            let off = (i * 131_071) % (size - 70_000);
            (
                off,
                aio.read_at(IoBuf::new(65536 + (i as usize % 3) * 1111), off),
            )
        })
        .collect();
    for (off, f) in reads {
        let got = pollster::block_on(f).unwrap();
        let o = off as usize;
        assert_eq!(&got[..], &model[o..o + got.len()], "{name}: read at {off}");
    }
    drop(aio);
    image.close().unwrap();
    drop(image);
    drop(dev);
    let plain = open(&img, Some(fmt), &ImageOptions::read_only(true)).unwrap();
    assert!(
        read_all(plain.device.as_ref()) == model,
        "{name}: sync read-back"
    );
    drop(plain);
    let reference = dir.path().join("model.raw");
    std::fs::write(&reference, &model).unwrap();
    assert!(
        qemu_compare(&img, name, &reference, "raw"),
        "{name}: qemu-img compare"
    );
}

#[test]
fn raw() {
    round_trip(Format::Raw, "raw");
}

#[test]
fn qcow2() {
    round_trip(Format::Qcow2, "qcow2");
}

#[test]
fn vdi() {
    round_trip(Format::Vdi, "vdi");
}

#[test]
fn vhdx() {
    round_trip(Format::Vhdx, "vhdx");
}

#[test]
fn vpc() {
    round_trip(Format::Vpc, "vpc");
}

#[test]
fn vmdk() {
    round_trip(Format::Vmdk, "vmdk");
}

/// A read-only open on io_uring reads what qemu wrote, through the async face's
/// io_uring path (one read over every block of the image).
#[test]
fn reads_what_qemu_wrote() {
    let dir = tempdir();
    let img = dir.path().join("q.vdi");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, pattern(7, 1 << 20)).unwrap();
    qemu_img_ok(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vdi",
        &src.to_string_lossy(),
        &img.to_string_lossy(),
    ]);
    let image = open(&img, Some(Format::Vdi), &uring_opts(true)).unwrap();
    let aio = Arc::new(AsyncDevice::new(image.device.clone()).unwrap());
    let got = pollster::block_on(aio.read_at(IoBuf::new(1 << 20), 0)).unwrap();
    assert!(got[..] == pattern(7, 1 << 20)[..]);
}
