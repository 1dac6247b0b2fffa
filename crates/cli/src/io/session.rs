//! The state of one qemu-io session: the open image ([`Blk`]) with how it was opened
//! ([`Spec`], [`OpenFlags`]), the outstanding asynchronous requests ([`Aio`]) and the
//! errno values commands return. A leaf: the command modules use it, it uses none of them.

use std::collections::VecDeque;
use std::sync::Arc;

use diskimg::blockio::AsyncDevice;
use diskimg::{BlockDevice, Image, OptionList};

use super::blkdebug::Engine;
use super::medium::OpenedAt;
use super::out::Out;

/// `EINVAL` as qemu-io's commands return it.
pub(super) const EINVAL: i32 = 22;
/// `ENOTSUP` (Linux) as qemu-io's commands return it.
pub(super) const ENOTSUP: i32 = 95;
/// No medium found (a node whose driver a fatal corruption event took away).
pub(super) const ENOMEDIUM: i32 = 123;
/// qemu's largest request (`BDRV_REQUEST_MAX_BYTES`).
pub(super) const MAX_REQUEST: u64 = (i32::MAX as u64 >> 9) << 9;

/// The open image.
pub(crate) struct Blk {
    /// The opened chain (what `map`/`alloc` look at).
    pub(super) img: Image,
    /// Where requests go (the image, or a snapshot / copy-on-read layer over it).
    pub(super) dev: Arc<dyn BlockDevice>,
    /// Writes are refused (`-r`, `reopen -r`).
    pub(super) read_only: bool,
    /// Every write is followed by a flush (cache mode `writethrough`, qemu-io's default).
    pub(super) writethrough: bool,
    /// A command asked to write since the open (qemu flushes at close only then).
    pub(super) written: std::cell::Cell<bool>,
    /// How it was opened (for `reopen`).
    pub(super) spec: Spec,
    /// The rule engine of the topmost blkdebug node (qemu's `bdrv_find_debug_node`),
    /// where `break`/`resume`/`wait_break` go.
    pub(super) debug: Option<Arc<Engine>>,
    /// The image opened writable: when ([`OpenedAt`]); gone after a fatal corruption
    /// event since ([`Blk::gone`]).
    pub(super) opened: Option<OpenedAt>,
}

/// One qemu-io session: output, the open image, pending asynchronous requests.
pub(crate) struct Session {
    pub(super) out: Out,
    pub(super) blk: Option<Blk>,
    pub(super) image_opts: bool,
    pub(super) quit: bool,
    pub(super) aio: Aio,
}

impl Blk {
    /// True after a fatal corruption event of the writable image: qemu's node has no
    /// driver left, and its length cannot be queried (`No medium found`).
    pub(super) fn gone(&self) -> bool {
        self.opened.is_some_and(OpenedAt::gone)
    }
}

impl Session {
    /// Waits for every outstanding asynchronous request and prints its report.
    pub(super) fn drain(&mut self) {
        let done = self.aio.drain();
        self.print_notes();
        for text in done {
            self.out.print(&text);
        }
    }

    /// Prints what the blkdebug node said since the last call (suspended and resumed
    /// requests).
    pub(super) fn print_notes(&mut self) {
        let Some(e) = self.blk.as_ref().and_then(|b| b.debug.as_ref()) else {
            return;
        };
        for n in e.take_notes() {
            self.out.print(&n);
        }
    }

    /// True while asynchronous requests are outstanding (not yet reported).
    pub(super) fn in_flight(&self) -> bool {
        self.aio.pending() > 0
    }
}

/// How to open an image (qemu's `BDRV_O_*` flags that matter here).
#[derive(Clone, Debug)]
pub(super) struct OpenFlags {
    pub(super) read_only: bool,
    pub(super) snapshot: bool,
    pub(super) copy_on_read: bool,
    pub(super) nocache: bool,
    pub(super) writethrough: bool,
    pub(super) force_share: bool,
}

impl Default for OpenFlags {
    fn default() -> Self {
        Self {
            read_only: false,
            snapshot: false,
            copy_on_read: false,
            nocache: false,
            // qemu-io's default cache mode is writethrough.
            writethrough: true,
            force_share: false,
        }
    }
}

/// What an open was asked for (kept for `reopen`).
#[derive(Clone, Debug)]
pub(super) struct Spec {
    pub(super) name: Option<String>,
    pub(super) dict: OptionList,
    pub(super) flags: OpenFlags,
}

/// Requests running at once before a submission waits for the oldest; also the worker
/// threads of the async face (requests that block, e.g. at a blkdebug breakpoint, each
/// hold one, as each of qemu's coroutines may).
const MAX_INFLIGHT: usize = 64;

/// Completes one request (waits for its future) and returns its report text.
pub(super) type Completion = Box<dyn FnOnce() -> String>;

/// The outstanding requests, oldest first, on the async face of the open device
/// ([`AsyncDevice`], made at the first request after a drain and dropped at the drain,
/// so a later `close`/`open` sees no reference to the old device).
#[derive(Default)]
pub(super) struct Aio {
    face: Option<AsyncDevice>,
    inflight: VecDeque<Completion>,
}

impl Aio {
    /// The async face of `dev` for new requests.
    pub(super) fn face(&mut self, dev: &Arc<dyn BlockDevice>) -> diskimg::Result<&AsyncDevice> {
        if !self
            .face
            .as_ref()
            .is_some_and(|f| Arc::ptr_eq(f.device(), dev))
        {
            self.face = Some(AsyncDevice::with_workers(dev.clone(), MAX_INFLIGHT)?);
        }
        self.face
            .as_ref()
            .ok_or(diskimg::Error::internal("async face"))
    }

    /// The number of requests not yet reported.
    pub(super) fn pending(&self) -> usize {
        self.inflight.len()
    }

    /// Waits for every request; returns their reports in submission order.
    pub(super) fn drain(&mut self) -> Vec<String> {
        let done = self.inflight.drain(..).map(|c| c()).collect();
        self.face = None;
        done
    }

    /// Queues `done` (the completion of a request already submitted); returns the report
    /// of a request that had to finish first.
    pub(super) fn submit(&mut self, done: Completion) -> Option<String> {
        let first = if self.inflight.len() >= MAX_INFLIGHT {
            self.inflight.pop_front().map(|c| c())
        } else {
            None
        };
        self.inflight.push_back(done);
        first
    }
}
