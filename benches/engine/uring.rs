//! The io_uring row: random 4 KiB reads through the library's async face on an io_uring
//! (`ImageOptions::with_io_uring`, `O_DIRECT` as `qemu-img bench -t none`), `depth`
//! requests in flight from one thread. The thread polls its futures itself (no runtime):
//! the reads that completed are replaced by the next ones, each submitted as it is
//! started; when none is ready the thread waits with [`park_until`], which reaps the
//! ring on this thread (no hop through the ring's completion thread).
//!
//! Two knobs give the variants measured against (docs/benchmarks.md, session 6):
//! `BENCH_URING_PLUG=1` starts each round of refills under one [`Plug`] (one
//! `io_uring_enter` for them; measured 15 % slower on this virtio disk),
//! `BENCH_URING_PARK=std` parks with `std::thread::park` (the completion thread reaps).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use diskimg::blockio::{AsyncDevice, CacheMode, IoBuf, IoFuture, Plug, park_until};
use diskimg::{Format, ImageOptions};

/// Wakes the benchmark thread: a completion sets the flag and unparks it.
struct Unpark {
    woken: AtomicBool,
    thread: Thread,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

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
    let unpark = Arc::new(Unpark {
        woken: AtomicBool::new(false),
        thread: std::thread::current(),
    });
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    let batch = std::env::var("BENCH_URING_PLUG").is_ok_and(|v| v == "1");
    let std_park = std::env::var("BENCH_URING_PARK").is_ok_and(|v| v == "std");
    let mut next = offs.iter();
    let t = Instant::now();
    let plug = Plug::new();
    let mut flight: Vec<IoFuture<IoBuf>> = next
        .by_ref()
        .take(depth)
        .map(|&o| aio.read_at(IoBuf::new(len), o))
        .collect();
    drop(plug);
    let mut done: Vec<(usize, IoBuf)> = Vec::with_capacity(depth);
    while !flight.is_empty() {
        unpark.woken.store(false, Ordering::Release);
        for (i, f) in flight.iter_mut().enumerate() {
            if let Poll::Ready(r) = Pin::new(f).poll(&mut cx) {
                done.push((i, r.expect("read")));
            }
        }
        if done.is_empty() {
            if std_park {
                while !unpark.woken.load(Ordering::Acquire) {
                    std::thread::park();
                }
            } else {
                park_until(|| unpark.woken.load(Ordering::Acquire));
            }
            continue;
        }
        let plug = batch.then(Plug::new);
        // Highest index first: `swap_remove` moves only futures already looked at.
        for (i, buf) in done.drain(..).rev() {
            match next.next() {
                Some(&o) => flight[i] = aio.read_at(buf, o),
                None => drop(flight.swap_remove(i)),
            }
        }
        drop(plug);
    }
    t.elapsed()
}
