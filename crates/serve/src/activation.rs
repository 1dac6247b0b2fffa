//! systemd socket activation (`sd_listen_fds(3)`), as qemu-nbd does it: a parent that
//! created and bound the listening socket (systemd, or libnbd's
//! `nbd_connect_systemd_socket_activation` behind `nbdinfo [ CMD ]`, `nbdcopy [ CMD ]`)
//! passes it as file descriptor 3 and names our process in `LISTEN_PID`, with
//! `LISTEN_FDS` giving how many sockets follow.
//!
//! This module uses `unsafe` for one thing only: taking ownership of descriptor 3
//! ([`take_fd3`]), which no safe API can do because the descriptor was opened by
//! another program. Everything else stays safe.
#![allow(unsafe_code)]

use std::io;
use std::net::TcpListener;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};

/// The first descriptor passed by socket activation (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;

/// Whether [`take_fd3`] already gave descriptor 3 away.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// How many sockets the activation protocol passed to this process: 0 without
/// activation. As qemu's `check_socket_activation`: `LISTEN_PID` must be our pid and
/// `LISTEN_FDS` a decimal number, otherwise the process was not activated.
///
/// The variables are left in the environment (qemu unsets them): Rust 2024 makes
/// changing the environment of a process with threads `unsafe`, and a child could not
/// take them for itself anyway, as its pid differs from `LISTEN_PID` and the
/// descriptor is made close-on-exec when taken.
pub(crate) fn listen_fds() -> u32 {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    match (pid.and_then(|p| p.parse::<u32>().ok()), fds) {
        (Some(p), Some(n)) if p == std::process::id() => n.parse().unwrap_or(0),
        _ => 0,
    }
}

/// The listening socket passed as descriptor 3: a unix or a TCP listener (the socket's
/// own address tells which).
pub(crate) enum Activated {
    /// `AF_UNIX`.
    Unix(UnixListener),
    /// `AF_INET` or `AF_INET6`.
    Tcp(TcpListener),
}

/// Wraps descriptor 3 as a listener; an error if it was taken already, is not open, or
/// is not a socket of a family we serve.
pub(crate) fn take_listener() -> io::Result<Activated> {
    let fd = take_fd3()?;
    // std's TCP `local_addr` refuses a non-IP family, its unix one a non-unix family.
    let tcp = TcpListener::from(fd);
    if tcp.local_addr().is_ok() {
        return Ok(Activated::Tcp(tcp));
    }
    let unix = UnixListener::from(OwnedFd::from(tcp));
    unix.local_addr()?;
    Ok(Activated::Unix(unix))
}

/// Takes ownership of descriptor 3, checked to be an open socket, at most once in the
/// process's life, and marks it close-on-exec.
fn take_fd3() -> io::Result<OwnedFd> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other("the activation socket was taken already"));
    }
    // SAFETY: borrowing: descriptor 3 stays open for the duration of this call (nothing
    // in this process closes a descriptor it does not own, and nobody owns 3 yet, see
    // below); an unopened descriptor only makes fstat fail with EBADF.
    let borrowed = unsafe { BorrowedFd::borrow_raw(FIRST_FD) };
    let st = rustix::fs::fstat(borrowed).map_err(|e| {
        io::Error::other(format!(
            "Socket activation failed: invalid file descriptor fd = {FIRST_FD}: {e}"
        ))
    })?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        return Err(io::Error::other(format!(
            "Socket activation failed: fd {FIRST_FD} is not a socket"
        )));
    }
    rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC)?;
    // SAFETY: owning: by the activation protocol (checked by the caller through
    // `listen_fds`: LISTEN_PID is our pid) descriptor 3 was opened by our parent for
    // us and nothing in this process opened or owns it; it is an open socket (checked
    // above), and `TAKEN` makes this the only `OwnedFd` ever made from it, so it is
    // closed exactly once, when the listener is dropped.
    Ok(unsafe { OwnedFd::from_raw_fd(FIRST_FD) })
}
