//! The requests in flight on a blkdebug node and qemu's serialisation among them
//! (`block/io.c`: `tracked_request_begin`, `bdrv_make_request_serialising`,
//! `bdrv_wait_serialising_requests`): a write that must read-modify-write blocks of the
//! node's request alignment is *serialising* and waits for every overlapping request
//! before it reads; any request waits for overlapping serialising ones before it writes.
//! A request does not wait for one that is itself waiting (that one waits for it once it
//! wakes; qemu's deadlock rule).

use std::sync::{Condvar, Mutex, MutexGuard};

/// One request in flight.
#[derive(Debug)]
struct Req {
    id: u64,
    /// The bytes it covers (for a serialising request, widened to whole blocks).
    start: u64,
    end: u64,
    serialising: bool,
    /// The request it waits for.
    waiting_for: Option<u64>,
}

#[derive(Debug, Default)]
struct List {
    reqs: Vec<Req>,
    next: u64,
}

/// The requests in flight on one node.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    list: Mutex<List>,
    /// Signalled when a request ends.
    ended: Condvar,
}

/// A request in flight; it ends when dropped.
pub(crate) struct Tracked<'a> {
    tracker: &'a Tracker,
    id: u64,
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, List> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking a request over `start..end`, the most recent first (qemu's list
    /// order, which decides whom a request waits for first).
    pub(crate) fn begin(&self, start: u64, end: u64) -> Tracked<'_> {
        let mut l = self.lock();
        let id = l.next;
        l.next += 1;
        l.reqs.insert(
            0,
            Req {
                id,
                start,
                end,
                serialising: false,
                waiting_for: None,
            },
        );
        Tracked { tracker: self, id }
    }

    /// Waits while a request conflicts with `id` (see the module docs).
    fn wait_locked<'g>(&'g self, mut l: MutexGuard<'g, List>, id: u64) -> MutexGuard<'g, List> {
        loop {
            let Some(me) = l.reqs.iter().find(|r| r.id == id) else {
                return l;
            };
            let (start, end, ser) = (me.start, me.end, me.serialising);
            let conflict = l.reqs.iter().find(|r| {
                r.id != id
                    && (r.serialising || ser)
                    && r.start < end
                    && start < r.end
                    && r.waiting_for.is_none()
            });
            let Some(other) = conflict.map(|r| r.id) else {
                return l;
            };
            set_waiting(&mut l, id, Some(other));
            while l.reqs.iter().any(|r| r.id == other) {
                l = self.ended.wait(l).unwrap_or_else(|e| e.into_inner());
            }
            set_waiting(&mut l, id, None);
        }
    }
}

fn set_waiting(l: &mut List, id: u64, to: Option<u64>) {
    if let Some(r) = l.reqs.iter_mut().find(|r| r.id == id) {
        r.waiting_for = to;
    }
}

impl Tracked<'_> {
    /// Makes the request serialising over whole blocks of `align` and waits for the
    /// requests it overlaps.
    pub(crate) fn serialise(&self, align: u64) {
        let t = self.tracker;
        let mut l = t.lock();
        if let Some(r) = l.reqs.iter_mut().find(|r| r.id == self.id) {
            r.serialising = true;
            r.start -= r.start % align;
            r.end = r.end.div_ceil(align).saturating_mul(align);
        }
        drop(t.wait_locked(l, self.id));
    }

    /// Waits for the overlapping serialising requests (before writing).
    pub(crate) fn wait_serialising(&self) {
        let t = self.tracker;
        drop(t.wait_locked(t.lock(), self.id));
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let t = self.tracker;
        t.lock().reqs.retain(|r| r.id != self.id);
        t.ended.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn serialising_requests_wait_for_overlaps_and_others_for_them() {
        let t = Arc::new(Tracker::default());
        let a = t.begin(0x200, 0x400);
        a.serialise(0x1000);
        // A request elsewhere does not wait.
        t.begin(0x1000, 0x2000).wait_serialising();
        let waiter = {
            let t = t.clone();
            std::thread::spawn(move || {
                let b = t.begin(0x800, 0xa00);
                b.wait_serialising();
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "overlaps the serialising request");
        drop(a);
        waiter.join().unwrap();
        assert!(t.lock().reqs.is_empty());
    }
}
