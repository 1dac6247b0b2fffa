//! The io_uring row: random 4 KiB reads through the library's async face on an io_uring
//! (`ImageOptions::with_io_uring`, `O_DIRECT` as `qemu-img bench -t none`), `depth`
//! requests in flight from one thread, driven by `pollster::block_on` (no runtime).

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use diskimg::blockio::{AsyncDevice, CacheMode, IoBuf};
use diskimg::{Format, ImageOptions};

/// Reads `len` bytes at each of `offs` with `depth` in flight; the time taken.
pub fn reads(path: &Path, offs: &[u64], len: usize, depth: usize) -> Duration {
    let opts = ImageOptions::read_only(true)
        .with_cache(CacheMode::None)
        .with_io_uring(depth)
        .expect("io_uring");
    let img = diskimg::open(path, Some(Format::Qcow2), &opts).expect("diskimg open");
    // Workers for what cannot go to the ring (none on an allocated image whose format
    // answers the layout walk); as many as the depth so that the depth holds either way.
    let aio = AsyncDevice::with_workers(img.device.clone(), depth).expect("async face");
    let mut free: Vec<IoBuf> = (0..depth).map(|_| IoBuf::new(len)).collect();
    let mut q: VecDeque<diskimg::blockio::IoFuture<IoBuf>> = VecDeque::with_capacity(depth);
    let t = Instant::now();
    for &o in offs {
        if q.len() == depth {
            let f = q.pop_front().expect("in flight");
            free.push(pollster::block_on(f).expect("read"));
        }
        let buf = free.pop().expect("a free buffer");
        q.push_back(aio.read_at(buf, o));
    }
    for f in q {
        pollster::block_on(f).expect("read");
    }
    t.elapsed()
}
