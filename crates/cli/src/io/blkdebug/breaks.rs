//! qemu-io's blkdebug breakpoints on an [`Engine`]: `break EVENT TAG` adds a rule that
//! suspends the next request raising EVENT (the thread running it waits in
//! [`Engine::event`]), `wait_break TAG` waits until a request tagged so is suspended,
//! `resume TAG` lets the most recently suspended one go on, `remove_break TAG` drops the
//! breakpoints of the tag and resumes its requests (qemu's `block/blkdebug.c`:
//! `blkdebug_debug_breakpoint`, `_resume`, `_remove_breakpoint`, `_is_suspended`).
//!
//! The `blkdebug: Suspended request 'A'` / `Resuming request 'A'` lines qemu prints are
//! kept as notes ([`Engine::take_notes`]) for qemu-io to print between its own output.

use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use diskimg::blockio::DebugEvent;

use super::rules::{Action, Engine, Rule, State};

/// `ENOENT`, what blkdebug answers for an unknown event or tag.
pub(crate) const ENOENT: i32 = 2;

impl State {
    /// Suspends a request at breakpoint rule `id` (removed: it fires once); returns the
    /// request's id.
    pub(super) fn suspend(&mut self, id: u64, tag: String) -> u64 {
        self.remove(id);
        let req = self.next_id;
        self.next_id += 1;
        self.notes
            .push(format!("blkdebug: Suspended request '{tag}'\n"));
        self.suspended.insert(0, (req, tag));
        req
    }

    /// Resumes the most recently suspended request tagged `tag`; false if none is.
    fn resume(&mut self, tag: &str) -> bool {
        let Some(i) = self.suspended.iter().position(|(_, t)| t == tag) else {
            return false;
        };
        self.suspended.remove(i);
        self.notes
            .push(format!("blkdebug: Resuming request '{tag}'\n"));
        true
    }
}

impl Engine {
    /// Waits (holding nothing but the engine's condition) until the requests `reqs` are
    /// resumed.
    pub(super) fn wait_resumed(&self, mut s: MutexGuard<'_, State>, reqs: &[u64]) {
        while s.suspended.iter().any(|(r, _)| reqs.contains(r)) {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// `break EVENT TAG`: suspends the next request raising `event`; `Err(ENOENT)` for
    /// an event blkdebug does not know.
    pub(crate) fn breakpoint(&self, event: &str, tag: &str) -> Result<(), i32> {
        let event = DebugEvent::from_name(event).ok_or(ENOENT)?;
        self.lock().add(Rule {
            event,
            state: 0,
            action: Action::Suspend(tag.to_string()),
        });
        Ok(())
    }

    /// `resume TAG`: `Err(ENOENT)` when no request tagged so is suspended.
    pub(crate) fn resume(&self, tag: &str) -> Result<(), i32> {
        let resumed = self.lock().resume(tag);
        self.changed.notify_all();
        if resumed { Ok(()) } else { Err(ENOENT) }
    }

    /// `remove_break TAG`: drops the tag's breakpoints and resumes its suspended
    /// requests; `Err(ENOENT)` when there was neither.
    pub(crate) fn remove_breakpoint(&self, tag: &str) -> Result<(), i32> {
        let mut s = self.lock();
        let ids: Vec<u64> = (s.rules.iter())
            .filter(|(_, r)| matches!(&r.action, Action::Suspend(t) if t == tag))
            .map(|(id, _)| *id)
            .collect();
        let mut found = !ids.is_empty();
        for id in ids {
            s.remove(id);
        }
        while s.resume(tag) {
            found = true;
        }
        drop(s);
        self.changed.notify_all();
        if found { Ok(()) } else { Err(ENOENT) }
    }

    /// True when a request tagged `tag` is suspended.
    pub(crate) fn is_suspended(&self, tag: &str) -> bool {
        self.lock().suspended.iter().any(|(_, t)| t == tag)
    }

    /// Waits until a request tagged `tag` is suspended, at most `limit`; true if one is.
    pub(crate) fn wait_suspended(&self, tag: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut s = self.lock();
        loop {
            if s.suspended.iter().any(|(_, t)| t == tag) {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = match self.changed.wait_timeout(s, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Resumes every suspended request and drops every breakpoint (a session ending
    /// with requests suspended), without notes.
    pub(crate) fn release_all(&self) {
        let mut s = self.lock();
        let ids: Vec<u64> = (s.rules.iter())
            .filter(|(_, r)| matches!(r.action, Action::Suspend(_)))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            s.remove(id);
        }
        s.suspended.clear();
        drop(s);
        self.changed.notify_all();
    }

    /// The messages qemu would have printed since the last call, oldest first.
    pub(crate) fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_breakpoint_suspends_one_request_until_resumed() {
        let e = Arc::new(Engine::new(Vec::new()));
        assert_eq!(e.breakpoint("no_such_event", "A"), Err(ENOENT));
        assert_eq!(e.resume("A"), Err(ENOENT));
        e.breakpoint("write_aio", "A").unwrap();
        let req = {
            let e = e.clone();
            std::thread::spawn(move || {
                e.event(DebugEvent::WriteAio);
                // The rule fired once: the next event passes.
                e.event(DebugEvent::WriteAio);
            })
        };
        assert!(e.wait_suspended("A", Duration::from_secs(30)));
        assert!(e.is_suspended("A") && !e.is_suspended("B"));
        assert!(!req.is_finished());
        e.resume("A").unwrap();
        req.join().unwrap();
        assert_eq!(
            e.take_notes(),
            [
                "blkdebug: Suspended request 'A'\n",
                "blkdebug: Resuming request 'A'\n"
            ]
        );
        assert!(e.take_notes().is_empty());
        e.breakpoint("l2_load", "B").unwrap();
        e.remove_breakpoint("B").unwrap();
        assert_eq!(e.remove_breakpoint("B"), Err(ENOENT));
        e.event(DebugEvent::L2Load);
        assert!(!e.wait_suspended("B", Duration::from_millis(10)));
    }
}
