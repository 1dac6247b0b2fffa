//! The completion of the requests a queue executes: each one's used entry, its
//! queue's busy count, the batch's notification and the requests in flight, whether it
//! finished, failed, or panicked ([`Finish`]); and a split request's ([`Pieces`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use vhost_user_backend::{VringRwLock, VringT};

use super::backend::{BlkBackend, Chain, Mem, MemGuard};
use super::request::S_IOERR;
use super::ring::Finisher;
use super::split::Split;

/// The completion of one request of a batch executed on the pool or the event thread:
/// [`Finish::used`] gives its head and used length, and the drop that follows takes it
/// off its queue's busy count, puts it in the used ring, notifies the driver if it was
/// the last of its batch to finish (`left` counts the batch's unfinished requests, so a
/// burst costs the guest one interrupt, not one per request), and takes it off the
/// requests in flight. Dropped unused, when executing the request panicked, it completes
/// `chain` with an I/O error ([`failed`]) and does the same, so neither the driver, nor
/// the batch's notification, nor [`BlkBackend::quiesce`] (and the flush after it) waits
/// for it forever.
///
/// The busy count drops before the used entry is published: a driver that sees the
/// entry may send its next request at once, and the event thread must then find the
/// queue idle if nothing else runs on it, or a queue at depth 1 looks deeper than it is
/// and its lone large requests are not split ([`BlkBackend::lone_streak`]). The other
/// order costs nothing that this one keeps: the request is still in flight
/// ([`BlkBackend::quiesce`] waits) until it is in the used ring, and a busy count that
/// is low for that moment only lets the event thread poll or split a little early.
pub(super) struct Finish<'a> {
    pub(super) be: &'a BlkBackend,
    pub(super) vring: &'a VringRwLock<Mem>,
    pub(super) queue: usize,
    pub(super) left: &'a AtomicUsize,
    /// The request, until it is completed (`None`: nothing to fail if it is not).
    pub(super) chain: Option<Chain>,
    /// Its head and used length, once executed.
    pub(super) done: Option<(u16, u32)>,
}

impl Finish<'_> {
    pub(super) fn used(mut self, done: (u16, u32)) {
        self.chain = None;
        self.done = Some(done);
    }
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        let done = match (self.done.take(), self.chain.take()) {
            (Some(done), _) => Some(done),
            (None, chain) => chain.map(failed),
        };
        if let Some(b) = self.be.busy_count(self.queue) {
            b.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some((head, len)) = done {
            let _ = self.vring.add_used(head, len);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.be.notify(self.vring);
        }
        self.be.in_flight(false, 1);
    }
}

/// The completion of a read served from its queue's io_uring (`ring.rs`): never the
/// last of a batch (`left` starts at 2), since whoever reaped it notifies the driver
/// once for all it reaped; one read again goes to the queue's pool
/// ([`BlkBackend::retry`]).
pub(super) struct RingFinish {
    pub(super) be: BlkBackend,
    pub(super) vring: VringRwLock<Mem>,
    pub(super) queue: usize,
}

impl Finisher<MemGuard> for RingFinish {
    fn done(&self, chain: &Chain, len: u32) {
        let left = AtomicUsize::new(2);
        let finish = Finish {
            be: &self.be,
            vring: &self.vring,
            queue: self.queue,
            left: &left,
            chain: None,
            done: None,
        };
        finish.used((chain.head_index(), len));
    }

    fn again(&self, chain: Chain) {
        self.be.retry(&self.vring, self.queue, chain);
    }
}

/// Requests executed on the event thread without a pool, off the requests in flight when
/// dropped (however `drain` ends).
pub(super) struct Flight<'a>(pub(super) &'a BlkBackend, pub(super) usize);

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.0.in_flight(false, self.1);
    }
}

/// A split request shared by the threads executing its pieces: the one that finishes
/// the last piece completes it ([`Finish`]). If a piece panicked, none does, and the
/// request fails ([`failed`]) when the last thread lets go of it.
pub(super) struct Pieces {
    pub(super) split: Split<MemGuard>,
    pub(super) chain: Chain,
    pub(super) be: BlkBackend,
    pub(super) vring: VringRwLock<Mem>,
    pub(super) queue: usize,
    /// 1: the request is a batch of its own.
    pub(super) left: AtomicUsize,
    pub(super) finished: AtomicBool,
}

impl Pieces {
    /// Executes pieces until none is left ([`Split::work`]), completing the request
    /// if this thread finished its last piece.
    pub(super) fn work(&self) {
        if let Some(done) = self.split.work(&self.be) {
            self.finished.store(true, Ordering::Release);
            self.finish().used(done);
        }
    }

    fn finish(&self) -> Finish<'_> {
        Finish {
            be: &self.be,
            vring: &self.vring,
            queue: self.queue,
            left: &self.left,
            chain: None,
            done: None,
        }
    }
}

impl Drop for Pieces {
    fn drop(&mut self) {
        if !*self.finished.get_mut() {
            let chain = self.chain.clone();
            let mut finish = self.finish();
            finish.chain = Some(chain);
            drop(finish);
        }
    }
}

/// Completes a request whose execution panicked with `VIRTIO_BLK_S_IOERR`, written to
/// its last driver-writable byte (what its data buffers hold is unspecified): the
/// driver sees an error, not a request that never ends. Used length 1, or 0 for a chain
/// without a writable byte (as [`process`](super::request::process) completes one).
pub(super) fn failed(chain: Chain) -> (u16, u32) {
    use std::io::Write;
    let head = chain.head_index();
    let mem = chain.memory();
    let Ok(mut writer) = chain.clone().writer(mem) else {
        return (head, 0);
    };
    let Some(last) = writer.available_bytes().checked_sub(1) else {
        return (head, 0);
    };
    let written = writer
        .split_at(last)
        .is_ok_and(|mut status| status.write_all(&[S_IOERR]).is_ok());
    (head, u32::from(written))
}
