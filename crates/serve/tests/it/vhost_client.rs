//! The vhost-user-blk export driven by a real client: libblkio's `virtio-blk-vhost-user`
//! driver (crates.io `blkio`, the driver of fio's libblkio engine and of QEMU's
//! `virtio-blk-vhost-user` blockdev), through benches/vhost-client's `Device`. Reads,
//! writes (one segment and many), write-zeroes, discard and flush on a qcow2 that
//! qemu-img made land in the image as `qemu-img compare` and `map` then show; a
//! read-only export is refused to a writable driver and serves reads to a read-only one.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use diskimg_blockio::{BlockDevice, CacheMode, Driver, FileStorage, OpenOptions, Storage};
use diskimg_serve::{Discard, Export, ExportOptions, Listener, Shutdown, VhostConfig};
use diskimg_testutil::{Rng, assert_qemu_check_clean, qemu_compare, qemu_img_ok, qemu_map_json};
use diskimg_vhost_client::dev::{Device, Done, Seg};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

struct Server {
    shutdown: Shutdown,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    fn start(image: &Path, sock: &Path, read_only: bool, cache: CacheMode) -> Server {
        let s: Arc<dyn Storage> =
            Arc::new(FileStorage::open_with(image, read_only, cache).unwrap());
        let o = OpenOptions::new().read_only(read_only);
        let dev: Arc<dyn BlockDevice> = diskimg_qcow2::DRIVER.open(s, &o).unwrap();
        let mut opts = ExportOptions::default();
        opts.read_only = read_only;
        opts.policy.discard = Discard::Unmap;
        let export = Arc::new(Export::new(dev, opts));
        let listener = Listener::unix(sock).unwrap();
        let shutdown = Shutdown::new();
        let sd = shutdown.clone();
        // As `diskimg serve --cache none` sets it up: a worker per request at the disk,
        // and plain reads on each queue's own io_uring.
        let mut config = VhostConfig::default();
        if cache == CacheMode::None {
            config.workers_per_queue = 16;
            config.notify_each = true;
            config.ring_depth = 256;
        }
        let thread = std::thread::spawn(move || {
            diskimg_serve::serve_vhost_user_blk(export, &listener, config, &sd)
        });
        Server {
            shutdown,
            thread: Some(thread),
        }
    }

    /// Shuts the server down (it flushes and closes the image) and waits for it.
    fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            t.join().unwrap().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// Waits for every queued request; returns their results in completion order.
fn finish(dev: &mut Device) -> Vec<Done> {
    let mut out = Vec::new();
    while dev.inflight() > 0 {
        dev.wait(1, &mut out).unwrap();
    }
    out
}

fn all_ok(dev: &mut Device) {
    for d in finish(dev) {
        assert_eq!(d.ret, 0, "request {} failed", d.tag);
    }
}

/// `len` bytes of the buffer at `off` as `pieces` equal segments.
fn segs(off: usize, len: usize, pieces: usize) -> Vec<Seg> {
    let n = len / pieces;
    (0..pieces)
        .map(|i| Seg {
            off: off + i * n,
            len: n,
        })
        .collect()
}

#[test]
fn libblkio_requests_land_in_the_qcow2() {
    requests_land(CacheMode::Writeback);
}

/// The same with the image `O_DIRECT` (`serve --cache none`): a guest's aligned pages
/// go to the file as one `pwritev` (qcow2 `overwrite_vectored`, blockio
/// `DirectIo::write_aligned_vectored`), with 16 workers per queue, a notification per
/// request and reads on the queues' io_urings, as the CLI sets it up.
#[test]
fn libblkio_requests_land_in_the_qcow2_with_o_direct() {
    requests_land(CacheMode::None);
}

fn requests_land(cache: CacheMode) {
    let dir = diskimg_testutil::tempdir();
    let image = dir.path().join("disk.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "8M"]);
    let sock = dir.path().join("blk.sock");
    let srv = Server::start(&image, &sock, false, cache);
    let mut dev = Device::connect(sock.to_str().unwrap(), 1024, 2 << 20, false).unwrap();
    let l = dev.limits().unwrap();
    assert_eq!(l.capacity, SIZE);
    assert!(!l.read_only);

    // The model: what the image must hold afterwards.
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(21);
    let data: Vec<u8> = (0..2 * MIB).map(|_| rng.next_u64() as u8).collect();
    dev.buf().unwrap().copy_from_slice(&data);
    // 1 MiB at 1 MiB in 256 segments of 4 KiB (a guest's pages), 64 KiB at 5 MiB +
    // 4 KiB in one segment, and 3 MiB..4 MiB as eight requests in flight at once.
    dev.write(MIB, &segs(0, MIB as usize, 256), 1).unwrap();
    dev.write(5 * MIB + 4096, &segs(MIB as usize, 64 << 10, 1), 2)
        .unwrap();
    for i in 0..8u64 {
        let off = (i * (128 << 10)) as usize;
        dev.write(
            3 * MIB + off as u64,
            &segs(off, 128 << 10, 4),
            10 + i as usize,
        )
        .unwrap();
    }
    all_ok(&mut dev);
    model[MIB as usize..2 * MIB as usize].copy_from_slice(&data[..MIB as usize]);
    model[(5 * MIB + 4096) as usize..][..64 << 10]
        .copy_from_slice(&data[MIB as usize..][..64 << 10]);
    model[3 * MIB as usize..4 * MIB as usize].copy_from_slice(&data[..MIB as usize]);

    // Zeroes over written data (kept allocated, then unmapped), a discard of two whole
    // clusters, and a flush.
    dev.write_zeroes(MIB + 4096, 8192, false, 3);
    dev.write_zeroes(3 * MIB, 128 << 10, true, 4);
    dev.discard(MIB + (512 << 10), 128 << 10, 5);
    dev.flush(6);
    all_ok(&mut dev);
    model[(MIB + 4096) as usize..][..8192].fill(0);
    model[3 * MIB as usize..][..128 << 10].fill(0);
    model[(MIB + (512 << 10)) as usize..][..128 << 10].fill(0);

    // Read everything back through the export, 2 MiB at a time in 4 KiB segments.
    for chunk in 0..SIZE / (2 * MIB) {
        dev.read(chunk * 2 * MIB, &segs(0, 2 * MIB as usize, 512), 7)
            .unwrap();
        all_ok(&mut dev);
        let want = &model[(chunk * 2 * MIB) as usize..][..2 * MIB as usize];
        assert!(
            dev.buf().unwrap() == want,
            "read-back differs in chunk {chunk}"
        );
    }
    // Out of range: an error, not a crash.
    dev.read(SIZE, &segs(0, 4096, 1), 8).unwrap();
    assert!(finish(&mut dev).iter().all(|d| d.ret < 0));
    drop(dev);
    srv.stop();

    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert!(
        qemu_compare(&image, "qcow2", &raw, "raw"),
        "qemu-img compare: image differs"
    );
    assert_qemu_check_clean(&image, "qcow2");
    // The unmapped zeroes and the discard left no data clusters behind.
    let map = qemu_map_json(&image, "qcow2");
    let data_at = |off: u64| {
        map.as_array().unwrap().iter().any(|e| {
            let (s, n) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            s <= off && off < s + n && e["data"].as_bool().unwrap()
        })
    };
    assert!(data_at(MIB) && data_at(5 * MIB + 4096) && data_at(3 * MIB + (128 << 10)));
    for off in [
        3 * MIB,
        3 * MIB + (64 << 10),
        MIB + (512 << 10),
        MIB + (576 << 10),
        7 * MIB,
    ] {
        assert!(!data_at(off), "data mapped at {off}: {map}");
    }
}

#[test]
fn libblkio_read_only_export() {
    let dir = diskimg_testutil::tempdir();
    let image = dir.path().join("ro.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "8M"]);
    diskimg_testutil::qemu_io(&image, "qcow2", &["write -P 0x33 0 64k"]);
    let sock = dir.path().join("ro.sock");
    let srv = Server::start(&image, &sock, true, CacheMode::Writeback);
    let sock = sock.to_str().unwrap();
    // A writable driver is refused (the device offers VIRTIO_BLK_F_RO).
    let e = Device::connect(sock, 256, 65536, false).err().unwrap();
    assert!(e.contains("read-only"), "{e}");
    let mut dev = Device::connect(sock, 256, 65536, true).unwrap();
    assert!(dev.limits().unwrap().read_only);
    dev.read(0, &segs(0, 65536, 16), 1).unwrap();
    all_ok(&mut dev);
    assert!(dev.buf().unwrap().iter().all(|&b| b == 0x33));
    dev.write(0, &segs(0, 4096, 1), 2).unwrap();
    dev.discard(0, 65536, 3);
    assert!(finish(&mut dev).iter().all(|d| d.ret < 0));
    drop(dev);
    srv.stop();
    assert_qemu_check_clean(&image, "qcow2");
    let out = diskimg_testutil::qemu_io(&image, "qcow2", &["read -P 0x33 0 64k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}
