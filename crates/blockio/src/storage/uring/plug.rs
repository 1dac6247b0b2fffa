//! Submission batching for one thread ([`Plug`](crate::Plug)): while a thread holds a
//! plug, the io_uring requests it submits wait in their rings' submission queues, and
//! one `io_uring_enter` per ring hands them to the kernel together when the plug is
//! dropped — or as soon as the thread polls a request that is not complete yet, so a
//! thread never waits for a request that it is itself holding back.
//!
//! One `io_uring_enter` for a batch instead of one per request: fewer system calls, and
//! the kernel's block layer sees the requests together (one device notification for
//! all, where a virtual machine's every notification is an exit to the hypervisor).

use std::cell::RefCell;
use std::sync::Arc;

use super::ring::Shared;

/// The calling thread's plug: how many guards are alive, and the rings holding
/// requests back.
#[derive(Default)]
struct Plugged {
    depth: usize,
    rings: Vec<Arc<Shared>>,
}

thread_local! {
    static PLUG: RefCell<Plugged> = RefCell::new(Plugged::default());
}

/// Starts (or nests) the calling thread's plug.
pub(crate) fn enter() {
    PLUG.with(|p| p.borrow_mut().depth += 1);
}

/// Ends one level of the calling thread's plug; the last submits what it held back.
pub(crate) fn exit() {
    let last = PLUG.with(|p| {
        let mut p = p.borrow_mut();
        p.depth = p.depth.saturating_sub(1);
        p.depth == 0
    });
    if last {
        flush();
    }
}

/// Submits what the calling thread's plug holds back (the plug stays).
pub(crate) fn flush() {
    let rings = PLUG.with(|p| std::mem::take(&mut p.borrow_mut().rings));
    for r in rings {
        r.kick();
    }
}

/// True when the calling thread is plugged: `ring` is then remembered, to be entered
/// once when the plug is flushed, instead of now.
pub(super) fn defer(ring: &Arc<Shared>) -> bool {
    PLUG.with(|p| {
        let mut p = p.borrow_mut();
        if p.depth == 0 {
            return false;
        }
        if !p.rings.iter().any(|r| Arc::ptr_eq(r, ring)) {
            p.rings.push(ring.clone());
        }
        true
    })
}
