//! The vhost-user-blk device: features, configuration space, and the queue handler
//! that rust-vmm's `vhost-user-backend` calls when the driver kicks a queue.
//!
//! Every queue has its own epoll thread (`queues_per_thread`), and each such thread
//! hands all but the last request it pops to a small worker pool, executing the last one
//! itself: a lone request is served without a thread hand-off, a burst runs in parallel.
//! A large last request (64 KiB or more) goes to the pool as well unless the queue is
//! at depth 1, so that its copy never keeps the thread from popping the next request.
//! Completions go back out of order, which virtio allows; the driver is notified once
//! per batch of small requests, by whichever of them finishes last (fewer interrupts
//! for the guest; the script's "guest interrupts per request" column shows it), and by
//! every large request on the pool as it finishes (or by every request:
//! [`VhostConfig::notify_each`]). A large read or write at queue depth 1 (its queue
//! idle, and the batches before it lone requests too) runs as pieces on the event
//! thread and the workers at once (`split.rs`).

use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use diskimg_blockio::Uring;

use super::VhostConfig;
use super::complete::{Finish, Flight, Pieces, RingFinish, failed};
use super::pool::{Job, Pool};
use super::request::{MAX_SEGMENTS, SECTOR, process};
use super::split::Split;
use crate::export::Export;

pub(super) type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
pub(super) type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;
pub(super) type Chain = DescriptorChain<MemGuard>;

/// Feature bits (virtio 1.2 section 5.2.3, section 6).
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;

/// Batches in a row of one request each, on an idle queue, before a large request is
/// split ([`VhostConfig::split_min`]): the driver is then waiting for each request
/// before it sends the next (queue depth 1), not just momentarily behind.
const LONE_STREAK: usize = 3;

/// Requests of at least this many bytes (data, header and status) are large: the
/// event thread hands them to the pool unless the queue is at depth 1 ([`large`]).
const LARGE: u64 = 64 << 10;

/// The backend handed to the daemon (cheap to clone: the daemon wants `Clone`).
#[derive(Clone)]
pub(crate) struct BlkBackend(Arc<Inner>);

struct Inner {
    export: Arc<Export>,
    config: VhostConfig,
    event_idx: AtomicBool,
    /// The guest memory (shared with the daemon, which updates it on SET_MEM_TABLE).
    mem: std::sync::RwLock<Mem>,
    /// Per queue, its worker pool (none without workers).
    pools: Vec<Pool>,
    /// Per queue, requests popped and not yet in the used ring.
    busy: Vec<AtomicUsize>,
    /// Per queue, how many batches in a row were one request on an idle queue.
    lone: Vec<AtomicUsize>,
    /// Threads that execute the pieces of a split request at most: the queue's workers
    /// and its event thread, or 1 (nothing is split) on a host of one core
    /// ([`VhostConfig::split_min`]).
    threads: usize,
    /// Requests of all queues in flight, and its waiters ([`BlkBackend::quiesce`]).
    in_flight: AtomicUsize,
    idle: (Mutex<()>, Condvar),
    /// Per queue, its own io_uring for plain reads (`ring.rs`; none when
    /// [`VhostConfig::ring_depth`] is 0 or the kernel has no io_uring).
    rings: Vec<Uring>,
}

impl BlkBackend {
    pub(crate) fn new(export: Arc<Export>, config: VhostConfig, mem: Mem) -> io::Result<Self> {
        let mut pools = Vec::new();
        for q in 0..config.num_queues {
            if config.workers_per_queue > 0 {
                pools.push(Pool::spawn(q, config.workers_per_queue)?);
            }
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let rings = match config.ring_depth {
            0 => Vec::new(),
            d => (0..config.num_queues)
                .map(|_| Uring::owned(usize::from(d)))
                .collect::<io::Result<Vec<_>>>()
                // No io_uring here (an old kernel, a sandbox): the workers read.
                .unwrap_or_default(),
        };
        Ok(BlkBackend(Arc::new(Inner {
            rings,
            export,
            config,
            event_idx: AtomicBool::new(false),
            mem: std::sync::RwLock::new(mem),
            pools,
            busy: (0..config.num_queues)
                .map(|_| AtomicUsize::new(0))
                .collect(),
            lone: (0..config.num_queues)
                .map(|_| AtomicUsize::new(0))
                .collect(),
            // One core: nothing would run side by side.
            threads: if cores > 1 {
                config.workers_per_queue.saturating_add(1)
            } else {
                1
            },
            in_flight: AtomicUsize::new(0),
            idle: (Mutex::new(()), Condvar::new()),
        })))
    }

    /// Waits until every request popped so far is in its used ring (the workers may
    /// still be executing some after the frontend went away), so that a flush after this
    /// covers them. Bounded only by the requests themselves.
    pub(crate) fn quiesce(&self) {
        let (lock, cv) = &self.0.idle;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        // The timeout covers a wake-up between the load and the wait.
        while self.0.in_flight.load(Ordering::Acquire) > 0 {
            // Reads on the queues' rings complete only when reaped, and the queues'
            // threads have stopped: reap here (their completions take `in_flight` down).
            drop(g);
            let ringed = self.0.rings.iter().map(Uring::reap).sum::<usize>()
                + self.0.rings.iter().map(Uring::in_flight).sum::<usize>();
            g = lock.lock().unwrap_or_else(|e| e.into_inner());
            let wait = if ringed > 0 { 1 } else { 20 };
            g = match cv.wait_timeout(g, Duration::from_millis(wait)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Counts `n` more (`more`) or fewer requests in flight.
    pub(super) fn in_flight(&self, more: bool, n: usize) {
        if more {
            self.0.in_flight.fetch_add(n, Ordering::AcqRel);
        } else if self.0.in_flight.fetch_sub(n, Ordering::AcqRel) == n {
            let _g = self.0.idle.0.lock().unwrap_or_else(|e| e.into_inner());
            self.0.idle.1.notify_all();
        }
    }

    /// `struct virtio_blk_config` (virtio 1.2 section 5.2.4), little endian.
    fn config_space(&self) -> Vec<u8> {
        let e = &self.0.export;
        let mut c = Vec::new();
        c.extend_from_slice(&(e.size() / SECTOR).to_le_bytes()); // capacity
        let config = &self.0.config;
        c.extend_from_slice(&config.size_max.to_le_bytes());
        let seg_max = match config.seg_max {
            0 => u32::from(config.queue_size.saturating_sub(2)).max(1),
            n => n,
        };
        c.extend_from_slice(&seg_max.to_le_bytes());
        c.extend_from_slice(&[0; 4]); // geometry
        c.extend_from_slice(&512u32.to_le_bytes()); // blk_size
        c.extend_from_slice(&[0, 0, 1, 0]); // physical_block_exp, alignment_offset, min_io_size
        c.extend_from_slice(&0u32.to_le_bytes()); // opt_io_size
        c.extend_from_slice(&[1, 0]); // writeback, unused
        c.extend_from_slice(&self.0.config.num_queues.to_le_bytes());
        let max_sectors = (u32::MAX / 512) & !7;
        c.extend_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
        c.extend_from_slice(&MAX_SEGMENTS.to_le_bytes()); // max_discard_seg
        c.extend_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
        c.extend_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        c.extend_from_slice(&MAX_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        c.extend_from_slice(&[1, 0, 0, 0]); // write_zeroes_may_unmap, unused
        c
    }

    /// Pops every available request of `vring` and executes them: on this thread when
    /// the queue has no worker pool (then the used ring is updated per request and the
    /// driver notified once for the batch), else all but the last go to the queue's
    /// pool and the last runs here; a lone large request on an idle queue is split into
    /// pieces first. Returns whether any request was found.
    fn drain(&self, queue: usize, vring: &VringRwLock<Mem>) -> io::Result<bool> {
        let chains: Vec<Chain> = {
            let mem = self
                .0
                .mem
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .memory();
            let mut state = vring.get_mut();
            match state.get_queue_mut().iter(mem) {
                Ok(it) => it.collect(),
                Err(_) => return Ok(false),
            }
        };
        if chains.is_empty() {
            return Ok(false);
        }
        self.in_flight(true, chains.len());
        let Some(pool) = self.0.pools.get(queue) else {
            let (mut used, _flight) = (false, Flight(self, chains.len()));
            for chain in chains {
                let (head, len) = self.execute(chain);
                used |= vring.add_used(head, len).is_ok();
            }
            if used {
                self.notify(vring);
            }
            return Ok(true);
        };
        let busy = self.0.busy.get(queue);
        let idle = busy.is_none_or(|b| b.fetch_add(chains.len(), Ordering::AcqRel) == 0);
        let lone = self.lone_streak(queue, idle && chains.len() == 1);
        let mut chains = chains;
        if let [chain] = chains.as_slice()
            && let Some(split) = self.split(lone >= LONE_STREAK, chain)
        {
            let chain = chain.clone();
            self.run_split(vring, (queue, chain), pool, split);
            return Ok(true);
        }
        if let Some(ring) = self.ring(queue) {
            {
                // One `io_uring_enter` for the batch's reads.
                let _plug = diskimg_blockio::Plug::new();
                chains.retain(|c| {
                    let finish = || RingFinish {
                        be: self.clone(),
                        vring: vring.clone(),
                        queue,
                    };
                    !super::ring::try_submit(&self.0.export, ring, c, finish)
                });
            }
            // A lone read on an idle queue (depth 1): wait for it here rather than
            // sleep in `epoll` and be woken for it.
            if chains.is_empty() && idle && ring.wait() > 0 {
                self.notify(vring);
            }
        }
        let Some(last) = chains.pop() else {
            return Ok(true);
        };
        // A large request while others are in flight goes to the pool too: executed
        // here, it would keep this thread from popping the next one (a 1 MiB copy takes
        // ~100 µs), and a queue of large requests arriving one per kick would run one
        // at a time.
        let last = if lone < LONE_STREAK && large(&last) {
            chains.push(last);
            None
        } else {
            Some(last)
        };
        // Large requests on the pool complete on their own: the driver hears of each
        // at once and can send the next while the others still copy. Held back for
        // the whole batch, three 1 MiB requests on two cores left one idle while the
        // third finished (page cache, 1 MiB at queue depth 16: 0.76x qemu-storage-
        // daemon's throughput; docs/benchmarks.md, "Session 10").
        // With `notify_each` every request does (an `O_DIRECT` image: its requests
        // wait for the disk and finish at different times).
        let each = self.0.config.notify_each;
        let chains: Vec<(Chain, bool)> = chains
            .into_iter()
            .map(|c| {
                let l = each || large(&c);
                (c, l)
            })
            .collect();
        let small =
            chains.iter().filter(|(_, l)| !l).count() + usize::from(last.is_some() && !each);
        let left = Arc::new(AtomicUsize::new(if each { 1 } else { small }));
        pool.submit(chains.into_iter().map(|(chain, alone)| {
            let (me, vr) = (self.clone(), vring.clone());
            let left = if alone {
                Arc::new(AtomicUsize::new(1))
            } else {
                left.clone()
            };
            Box::new(move || me.run(&vr, queue, chain, &left)) as Job
        }));
        if let Some(last) = last {
            self.run(vring, queue, last, &left);
        }
        Ok(true)
    }

    /// Counts a batch of `queue`: whether it was `lone` (one request, found the queue
    /// idle); returns how many batches in a row were, this one included.
    fn lone_streak(&self, queue: usize, lone: bool) -> usize {
        let Some(n) = self.0.lone.get(queue) else {
            return 0;
        };
        if lone {
            n.fetch_add(1, Ordering::AcqRel).saturating_add(1)
        } else {
            n.store(0, Ordering::Release);
            0
        }
    }

    /// The pieces of a lone large request when the queue has been serving one request
    /// at a time (`alone`: queue depth 1, where the other threads would otherwise idle;
    /// a deeper queue keeps them busy anyway, and splitting there only adds hand-offs).
    fn split(&self, alone: bool, chain: &Chain) -> Option<Split<MemGuard>> {
        let min = self.0.config.split_min;
        if !alone || min == 0 || self.0.threads < 2 {
            return None;
        }
        Split::plan(&self.0.export, chain, min, self.0.threads)
    }

    /// Executes a split request: wakes as many helpers from the queue's pool as there
    /// are pieces beyond the first (at most the queue's workers) and executes
    /// pieces itself until none is left; the thread that finishes the last piece
    /// completes the request and notifies the driver.
    fn run_split(
        &self,
        vring: &VringRwLock<Mem>,
        (queue, chain): (usize, Chain),
        pool: &Pool,
        split: Split<MemGuard>,
    ) {
        let split = Arc::new(Pieces {
            split,
            chain,
            be: self.clone(),
            vring: vring.clone(),
            queue,
            left: AtomicUsize::new(1),
            finished: AtomicBool::new(false),
        });
        let helpers = split.split.pieces().min(self.0.threads).saturating_sub(1);
        pool.submit((0..helpers).map(|_| {
            let s = split.clone();
            Box::new(move || s.work()) as Job
        }));
        // A piece that panics here fails the request (`Pieces`' drop), not the queue.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| split.work()));
    }

    /// Executes one request of a batch and completes it ([`Finish`]).
    fn run(&self, vring: &VringRwLock<Mem>, queue: usize, chain: Chain, left: &AtomicUsize) {
        let finish = Finish {
            be: self,
            vring,
            queue,
            left,
            chain: None,
            done: None,
        };
        finish.used(self.execute(chain));
    }

    /// Executes `chain` again on `queue`'s pool, where it completes and notifies the
    /// driver on its own (a read from the queue's ring whose runs may have moved: the
    /// queue's thread, which reaped it, goes on serving the queue meanwhile); without a
    /// pool, here, inside the reap whose reaper notifies.
    pub(super) fn retry(&self, vring: &VringRwLock<Mem>, queue: usize, chain: Chain) {
        let Some(pool) = self.0.pools.get(queue) else {
            self.run(vring, queue, chain, &AtomicUsize::new(2));
            return;
        };
        let (me, vr) = (self.clone(), vring.clone());
        let job = move || me.run(&vr, queue, chain, &AtomicUsize::new(1));
        pool.submit(std::iter::once(Box::new(job) as Job));
    }

    /// Executes one request: its head and used length, or, if executing it panicked,
    /// those of its failure ([`failed`]). The panic stops here, on whichever thread
    /// executes requests (the queue's event thread included): the rest of the batch
    /// still runs and completes, and the queue goes on being served.
    fn execute(&self, chain: Chain) -> (u16, u32) {
        let keep = chain.clone();
        let run = std::panic::AssertUnwindSafe(|| process(&self.0.export, chain));
        std::panic::catch_unwind(run).unwrap_or_else(|_| failed(keep))
    }

    /// Signals the driver that used buffers are there, unless it asked not to be
    /// (`VIRTIO_RING_F_EVENT_IDX`: only when the used index passes its `used_event`).
    pub(super) fn notify(&self, vring: &VringRwLock<Mem>) {
        let notify =
            !self.0.event_idx.load(Ordering::Relaxed) || vring.needs_notification().unwrap_or(true);
        if notify {
            let _ = vring.signal_used_queue();
        }
    }
}

/// Whether `chain` moves at least [`LARGE`] data bytes, from at most its first 18
/// descriptors (a header, 16 data pages and a status byte): cheap for the small
/// requests that are executed on the event thread.
fn large(chain: &Chain) -> bool {
    let mut bytes = 0u64;
    for d in chain.clone().take(18) {
        bytes = bytes.saturating_add(u64::from(d.len()));
    }
    bytes >= LARGE
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        usize::from(self.0.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.config.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_INDIRECT_DESC
            | F_EVENT_IDX
            | F_PROTOCOL_FEATURES
            | F_VERSION_1;
        if self.0.config.num_queues > 1 {
            f |= F_MQ;
        }
        if self.0.config.size_max > 0 {
            f |= F_SIZE_MAX;
        }
        if self.0.export.read_only() {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    /// `REPLY_ACK` and `CONFIGURE_MEM_SLOTS` (both handled by vhost-user-backend) are what
    /// libblkio's front end (fio's libblkio engine, QEMU's `virtio-blk-vhost-user`
    /// blockdev) requires besides `CONFIG`; qemu-storage-daemon offers them too.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(size).unwrap_or(0));
        c.get(start..end).map(<[u8]>::to_vec).unwrap_or_default()
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.0.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.config.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected event set"));
        }
        // The daemon numbers a thread's queues from 0 in its events and `vrings`; each
        // thread serves one queue (`queues_per_thread`), so the thread's index is the
        // queue's (its pool, busy count and ring).
        let local = usize::from(device_event);
        let q = thread_id;
        // The queue's ring (`ring.rs`; its id follows the daemon's own events').
        if local > self.num_queues() {
            if let (Some(ring), Some(vring)) = (self.ring(q), vrings.first())
                && ring.reap() > 0
            {
                self.notify(vring);
            }
            return Ok(());
        }
        let Some(vring) = vrings.get(local) else {
            return Err(io::Error::other("event for an unknown queue"));
        };
        if self.0.event_idx.load(Ordering::Relaxed) {
            loop {
                let _ = vring.disable_notification();
                let found = self.drain(q, vring)?;
                if found && self.poll(q, vring) {
                    continue;
                }
                if !vring.enable_notification().unwrap_or(false) {
                    break;
                }
            }
        } else {
            while self.drain(q, vring)? && self.poll(q, vring) {}
        }
        Ok(())
    }
}

impl BlkBackend {
    /// After a batch, watches the queue for the driver's next request for up to
    /// [`VhostConfig::poll_us`](super::VhostConfig::poll_us) (its notifications still
    /// off), as qemu's adaptive polling does: a driver at queue depth 1 sends its next
    /// request within microseconds of the last completion, and waking this thread for
    /// it would cost a cross-CPU wake-up (~60 µs on a VM's vCPUs). True when one came.
    /// Only when none of `queue`'s requests is still executing on its pool: at a deeper
    /// queue the workers need the cores the spin would take (1 MiB at queue depth 16 in
    /// the page cache lost 10 % to it), and the next kick comes soon anyway.
    fn poll(&self, queue: usize, vring: &VringRwLock<Mem>) -> bool {
        use virtio_queue::QueueT as _;
        let us = self.0.config.poll_us;
        let busy = self.0.busy.get(queue);
        if us == 0 || busy.is_some_and(|b| b.load(Ordering::Acquire) != 0) {
            return false;
        }
        let mem = self
            .0
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .memory();
        let end = Instant::now() + Duration::from_micros(us);
        loop {
            {
                let state = vring.get_ref();
                let queue = state.get_queue();
                if queue
                    .avail_idx(&*mem, Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != queue.next_avail())
                {
                    return true;
                }
            }
            if Instant::now() >= end {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}

impl BlkBackend {
    /// `queue`'s own io_uring (`ring.rs`), when it has one.
    pub(super) fn ring(&self, queue: usize) -> Option<&Uring> {
        self.0.rings.get(queue)
    }

    /// The epoll id of `queue`'s ring eventfd (after the queues' and the exit event's).
    pub(super) fn ring_event(&self, queue: usize) -> u64 {
        u64::from(self.0.config.num_queues) + 1 + queue as u64
    }

    /// `queue`'s busy count: its requests popped and not yet off it (none without a
    /// pool: the event thread runs every request there).
    pub(super) fn busy_count(&self, queue: usize) -> Option<&AtomicUsize> {
        self.0.busy.get(queue)
    }

    /// `queue`'s busy count now.
    #[cfg(test)]
    pub(super) fn busy(&self, queue: usize) -> usize {
        self.busy_count(queue)
            .map_or(0, |b| b.load(Ordering::Acquire))
    }
}

impl Deref for BlkBackend {
    type Target = Export;
    fn deref(&self) -> &Export {
        &self.0.export
    }
}
