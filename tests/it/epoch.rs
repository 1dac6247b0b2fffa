//! The host epoch (`BlockDevice::host_epoch`, issue 21) of the device `diskimg serve`
//! exports: images qemu-img made, opened as serve opens them (the CLI's `open_served`:
//! the qemu-compatible policy, backing chains followed, cache mode `none`, i.e.
//! `O_DIRECT`), writable and read-only. The vhost-user-blk queues read detached only
//! when it answers, so raw and qcow2 (alone or over a backing file) must.

use diskimg::blockio::CacheMode;
use diskimg::{Format, ImageOptions, OpenPolicy, open};
use diskimg_testutil::{qemu_create, qemu_create_overlay, tempdir};

fn served(path: &std::path::Path, fmt: Format, read_only: bool) -> diskimg::Image {
    let opts = ImageOptions::read_only(read_only)
        .with_policy(OpenPolicy::qemu_compatible())
        .with_backing(true)
        .with_cache(CacheMode::None);
    open(path, Some(fmt), &opts).unwrap()
}

#[test]
fn served_raw_and_qcow2_answer() {
    let dir = tempdir();
    let raw = dir.path().join("base.raw");
    let q = dir.path().join("top.qcow2");
    let lone = dir.path().join("lone.qcow2");
    qemu_create(&raw, "raw", "", Some("4M"));
    qemu_create(&lone, "qcow2", "", Some("4M"));
    qemu_create_overlay(&q, "qcow2", "base.raw", "raw", None);
    for ro in [false, true] {
        for (path, fmt, layers) in [
            (&raw, Format::Raw, 1),
            (&lone, Format::Qcow2, 1),
            (&q, Format::Qcow2, 2),
        ] {
            let img = served(path, fmt, ro);
            assert_eq!(img.chain().len(), layers, "{path:?}");
            let e = img.device.host_epoch();
            assert!(e.is_some(), "{path:?} (read-only: {ro}) has no host epoch");
            if !ro {
                // Writes in place and into fresh space leave it where it was.
                img.device.write_at(&[7u8; 65536], 0).unwrap();
                img.device.write_at(&[8u8; 4096], 65536).unwrap();
                img.device.flush().unwrap();
                assert_eq!(img.device.host_epoch(), e, "{path:?}");
            }
        }
    }
}
