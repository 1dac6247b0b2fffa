//! qemu-io's blkdebug commands: `break EVENT TAG`, `remove_break TAG`, `resume TAG`,
//! `wait_break TAG` (`qemu-io-cmds.c`), on the topmost blkdebug node of the open image
//! ([`super::session::Blk::debug`]; see [`super::blkdebug`] for what they do there).
//!
//! None of them waits for outstanding asynchronous requests first (the request a
//! breakpoint suspended is among them). `wait_break` waits as qemu's does, but gives up
//! (with a message) when no request is in flight that could reach the breakpoint, or
//! after [`WAIT_LIMIT`], where qemu would wait forever.

use std::sync::Arc;
use std::time::Duration;

use super::blkdebug::Engine;
use super::cmd::Cmd;
use super::session::{EINVAL, ENOTSUP, Session};
use crate::errmap::strerror;

/// How long `wait_break` waits for a request to reach its breakpoint.
const WAIT_LIMIT: Duration = Duration::from_secs(120);

/// The debug node, or `Err(ENOTSUP)` as qemu's `bdrv_debug_*` answer without one.
fn engine(s: &Session) -> Result<Arc<Engine>, i32> {
    s.blk.as_ref().and_then(|b| b.debug.clone()).ok_or(ENOTSUP)
}

fn errno_text(errno: i32) -> String {
    strerror(&std::io::Error::from_raw_os_error(errno).into())
}

fn break_f(s: &mut Session, _name: &str, args: &[String]) -> i32 {
    let [event, tag] = args else {
        return -EINVAL;
    };
    match engine(s).and_then(|e| e.breakpoint(event, tag)) {
        Ok(()) => 0,
        Err(errno) => {
            s.out.print(&format!(
                "Could not set breakpoint: {}\n",
                errno_text(errno)
            ));
            -errno
        }
    }
}

fn remove_break_f(s: &mut Session, _name: &str, args: &[String]) -> i32 {
    let [tag] = args else {
        return -EINVAL;
    };
    match engine(s).and_then(|e| e.remove_breakpoint(tag)) {
        Ok(()) => 0,
        Err(errno) => {
            s.out.print(&format!(
                "Could not remove breakpoint {tag}: {}\n",
                errno_text(errno)
            ));
            -errno
        }
    }
}

fn resume_f(s: &mut Session, _name: &str, args: &[String]) -> i32 {
    let [tag] = args else {
        return -EINVAL;
    };
    match engine(s).and_then(|e| e.resume(tag)) {
        Ok(()) => 0,
        Err(errno) => {
            s.out.print(&format!(
                "Could not resume request: {}\n",
                errno_text(errno)
            ));
            -errno
        }
    }
}

fn wait_break_f(s: &mut Session, _name: &str, args: &[String]) -> i32 {
    let [tag] = args else {
        return -EINVAL;
    };
    let Ok(e) = engine(s) else {
        s.out.error("no blkdebug node: no request can be suspended");
        return -ENOTSUP;
    };
    if e.is_suspended(tag) {
        return 0;
    }
    if !s.in_flight() {
        s.out.error(&format!(
            "no request in flight can reach the breakpoint '{tag}'"
        ));
        return -ENOTSUP;
    }
    if e.wait_suspended(tag, WAIT_LIMIT) {
        return 0;
    }
    s.out.error(&format!(
        "no request reached the breakpoint '{tag}' in {} s",
        WAIT_LIMIT.as_secs()
    ));
    -ENOTSUP
}

/// `break`, `remove_break`, `resume`, `wait_break`.
pub(super) static COMMANDS: &[&Cmd] = &[&BREAK, &REMOVE_BREAK, &RESUME, &WAIT_BREAK];

static BREAK: Cmd = Cmd {
    argmin: 2,
    argmax: 2,
    args: Some("event tag"),
    ..Cmd::new(
        "break",
        break_f,
        "sets a breakpoint on event and tags the stopped request as tag",
    )
};

static REMOVE_BREAK: Cmd = Cmd {
    argmin: 1,
    argmax: 1,
    args: Some("tag"),
    ..Cmd::new("remove_break", remove_break_f, "remove a breakpoint by tag")
};

static RESUME: Cmd = Cmd {
    argmin: 1,
    argmax: 1,
    args: Some("tag"),
    ..Cmd::new("resume", resume_f, "resumes the request tagged as tag")
};

static WAIT_BREAK: Cmd = Cmd {
    argmin: 1,
    argmax: 1,
    args: Some("tag"),
    ..Cmd::new(
        "wait_break",
        wait_break_f,
        "waits for the suspension of a request",
    )
};
