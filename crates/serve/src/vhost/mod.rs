//! vhost-user-blk: the export as a virtio block device whose queues a VMM (QEMU, Cloud
//! Hypervisor, crosvm) hands over a unix socket, built on rust-vmm's
//! `vhost-user-backend`, `virtio-queue` and `vm-memory`.
//!
//! [`serve_vhost_user_blk`] accepts one frontend at a time and serves it until it
//! disconnects, then waits for the next (a fresh device each time), until the
//! [`Shutdown`] is triggered; the export is flushed after every frontend and at the end.

mod backend;
mod complete;
mod fast;
mod guest;
mod pool;
mod request;
mod ring;
mod split;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_backend;
#[cfg(test)]
mod tests_hostile;
#[cfg(test)]
mod tests_ring;
#[cfg(test)]
mod tests_split;

use std::io;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener as VuListener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::export::Export;
use crate::listen::{Listener, Shutdown};
use backend::BlkBackend;

/// How the vhost-user-blk device looks to the guest.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct VhostConfig {
    /// Virtqueues (each served by its own thread; `VIRTIO_BLK_F_MQ` when above 1).
    pub num_queues: u16,
    /// Largest queue the driver may set up.
    pub queue_size: u16,
    /// Threads executing one queue's requests in parallel (besides its event thread,
    /// which executes the last request of every batch itself, unless it is large and
    /// the queue not at depth 1). 0: the event thread
    /// executes every request and notifies the driver once per batch, as
    /// qemu-storage-daemon's single thread does (docs/benchmarks.md compares the two).
    pub workers_per_queue: usize,
    /// A read or write of at least twice this many bytes that arrives while its queue
    /// has been serving one request at a time (queue depth 1: the last few batches were
    /// one request each, found the queue idle) is executed as pieces of at least this
    /// size on the queue's threads at once (at most `workers_per_queue + 1` pieces; not
    /// on a host of one core), so the copy of one large request uses more than one
    /// core, as qemu-storage-daemon's thread pool does with the pieces the guest cuts
    /// for it. 256 KiB (the default) makes a 1 MiB request four pieces, run by the
    /// event thread and up to three workers, whichever claims each first; 0: never
    /// split. Measured from the host (benches/serve-vhost-host.sh), splitting took a
    /// 1 MiB read at depth 1 from 0.67x qemu-storage-daemon's throughput to 0.90-0.97x
    /// and left writes as they were (docs/benchmarks.md, "Session 9").
    pub split_min: usize,
    /// Notify the driver as each request completes, not once per batch (by the
    /// batch's last request to finish; a large request always notifies on its own).
    /// Worth it when requests finish at different times, as on an `O_DIRECT` image
    /// where each waits for the disk: `diskimg serve --cache none` sets it, and 4 KiB
    /// at queue depth 16 went from 0.85-1.00x qemu-storage-daemon's IOPS to
    /// 1.03-1.12x (docs/benchmarks.md, "Session 10"). Off by default: fewer guest
    /// interrupts for a burst from the page cache.
    pub notify_each: bool,
    /// Most data segments the driver may put in one request (`seg_max`, offered with
    /// `VIRTIO_BLK_F_SEG_MAX`); 0 (the default): `queue_size - 2`.
    pub seg_max: u32,
    /// Largest data segment in bytes (`size_max`); 0 (the default): no limit, and
    /// `VIRTIO_BLK_F_SIZE_MAX` is not offered. Linux raises a limit under its page size
    /// to the page size, so `seg_max` pages then bound a request: qemu-storage-daemon's
    /// 126 and 4096 make the guest cut a 1 MiB read or write into three requests.
    pub size_max: u32,
    /// After executing a batch, the queue's thread watches the queue for the driver's
    /// next request for up to this many µs before it sleeps (0: never), as qemu's
    /// adaptive polling (`poll-max-ns`) does: at queue depth 1 a driver sends its next
    /// request within microseconds, and waking a sleeping thread for it costs far more
    /// on a VM's vCPUs. Measured from the host, 50 µs took 4 KiB reads at queue depth 1
    /// in the page cache from 1.35x to 3.67x qemu-storage-daemon's IOPS and writes from
    /// 0.90x to 1.55x (docs/benchmarks.md, "Session 11, end"), for one core kept busy
    /// while the requests keep coming; an idle queue costs nothing. Not while any of
    /// the queue's requests still runs on its pool (a deeper queue: the workers need
    /// the cores).
    pub poll_us: u64,
    /// Entries of each queue's own io_uring, on which the queue's thread submits plain
    /// reads straight into guest memory and completes them itself, without a worker
    /// (`ring.rs`); 0 (the default): every request goes through the workers. Where
    /// the kernel has no io_uring the workers read. `diskimg serve` sets 256 with
    /// `--cache none`/`directsync` (`--aio`).
    pub ring_depth: u16,
}

impl Default for VhostConfig {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 1024,
            workers_per_queue: 4,
            split_min: 256 << 10,
            notify_each: false,
            seg_max: 0,
            size_max: 0,
            poll_us: 50,
            ring_depth: 0,
        }
    }
}

fn other<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> io::Error + '_ {
    move |e| io::Error::other(format!("{what}: {e}"))
}

/// Serves `export` as a vhost-user-blk device on `listener` (a unix socket) until
/// `shutdown` is triggered.
pub fn serve_vhost_user_blk(
    export: Arc<Export>,
    listener: &Listener,
    config: VhostConfig,
    shutdown: &Shutdown,
) -> io::Result<()> {
    if config.num_queues == 0 || config.num_queues > 64 || config.queue_size == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "num-queues must be 1..=64",
        ));
    }
    let mut vu = VuListener::from(listener.unix_clone()?);
    let handle: Arc<Mutex<Option<ShutdownHandle>>> = Arc::default();
    let (wake, h) = (listener.waker(), handle.clone());
    let key = shutdown.on_trigger(Box::new(move || {
        if let Some(h) = h.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            h.shutdown();
        }
        wake();
    }));
    let result = (|| {
        // Accept only once a frontend is pending, so shutdown never waits in accept.
        while !shutdown.is_triggered() && listener.wait_pending()? {
            // A fresh device per frontend: the daemon keeps owner and vring state
            // from the previous one, which a reconnecting VMM would trip over.
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let backend = BlkBackend::new(export.clone(), config, mem.clone())?;
            let mut daemon =
                VhostUserDaemon::new("diskimg-vhost-user-blk".into(), backend.clone(), mem)
                    .map_err(other("cannot start the vhost-user daemon"))?;
            // Each queue's ring wakes the queue's own thread.
            for (q, h) in daemon.get_epoll_handlers().iter().enumerate() {
                if let Some(ring) = backend.ring(q) {
                    use std::os::fd::AsRawFd;
                    let fd = ring.event_fd().as_raw_fd();
                    h.register_listener(fd, EventSet::IN, backend.ring_event(q))
                        .map_err(other("cannot watch a queue's io_uring"))?;
                }
            }
            daemon
                .start(&mut vu)
                .map_err(other("vhost-user accept failed"))?;
            *handle.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
            if shutdown.is_triggered() {
                daemon.request_shutdown();
            }
            // A frontend that goes away, cleanly or not, ends only its own session.
            let _ = daemon.wait();
            *handle.lock().unwrap_or_else(|e| e.into_inner()) = None;
            // Requests the workers still execute land before the flush.
            backend.quiesce();
            export
                .flush()
                .map_err(|f| io::Error::other(format!("flush failed: {f:?}")))?;
        }
        Ok(())
    })();
    shutdown.forget(key);
    let flushed = export
        .flush()
        .map_err(|f| io::Error::other(format!("final flush failed: {f:?}")));
    result.and(flushed)
}
